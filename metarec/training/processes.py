"""Independent jobs (e.g. one seed each) in worker processes, reported as if run in this one.

XLA's CPU backend keeps both cores of a small machine busy only while a large computation runs;
the host-side work between computations (task draws, neighbour features, bookkeeping) leaves one
idle. Jobs that share nothing can overlap in separate processes. Each job runs in a freshly
*spawned* process (JAX is multithreaded, so forking it is unsafe) with its own compiled functions.
A job's results do not depend on which process ran it: the same programs run on the same inputs
with the same thread pool (tests/integration/test_coldstart.py checks it bit for bit).

Everything a job reports reaches this process through one queue, in the order the job sent it:

* ``log_fn(msg)`` lines -> this process's ``log_fn``;
* ``metrics.write(record)`` / ``metrics.truncate(unit, step)`` -> this process's metrics writer;
* Python ``logging`` records (library logs) at or above this process's root logger level -> the
  handlers of this process's loggers, where those loggers' levels let them through;
* JAX's compile-time events -> :func:`metarec.training.compile_time.add_seconds` here, so a run's
  recorded compile seconds are summed over its processes.

Typical use (see :func:`experiments.coldstart.pipeline.run`)::

    results = map_in_processes(
        functools.partial(job, common_args), items, workers=3, log_fn=log_fn, metrics=writer
    )

where ``job(item, *, log_fn, metrics)`` is a module-level function (it is pickled by name).

:class:`WorkerGroup` keeps its workers instead: each builds the state of some keys once (e.g. one
seed's prepared data, which holds closures that cannot be pickled), then runs many calls on it
(the tune stage's trials, :mod:`experiments.tune.pipeline`).
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import functools
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import queue as queue_lib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from metarec.training import compile_time

#: seconds to wait for a finished job's last messages (they are sent before it returns)
_FLUSH_SECONDS = 60.0

# the worker side's queue, set once per worker process by :func:`_init_worker`
_worker = {"queue": None}


class _QueueMetrics:
    """A metrics writer in a worker process: forwards ``write`` and ``truncate`` to the parent."""

    def __init__(self, queue):
        self._queue = queue

    def write(self, record: dict) -> None:
        self._queue.put(("metric", record))

    def truncate(self, unit: str, after_step: int) -> None:
        self._queue.put(("truncate", unit, after_step))


def _send_compile_event(event: str, duration_secs: float, **kwargs) -> None:
    if event in compile_time.COMPILE_EVENTS:
        _worker["queue"].put(("compile", event, float(duration_secs)))


def _exit_with_parent() -> None:
    """End this worker when its parent ends, even mid-job (a killed parent would otherwise leave
    its workers computing for minutes)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def _init_worker(queue, jax_settings: dict, log_level: int) -> None:
    """Runs once in each worker: the parent's compilation-cache settings, library logs and compile
    events sent to the parent."""
    _worker["queue"] = queue
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)]
    root.setLevel(log_level)
    import jax

    for name, value in jax_settings.items():
        jax.config.update(name, value)
    jax.monitoring.register_event_duration_secs_listener(_send_compile_event)


def _run_job(fn: Callable, item, token: int, with_metrics: bool):
    queue = _worker["queue"]
    try:
        return fn(
            item,
            log_fn=lambda msg: queue.put(("log", str(msg))),
            metrics=_QueueMetrics(queue) if with_metrics else None,
        )
    finally:
        queue.put(("done", token))


# the compilation-cache settings a worker copies from its parent
_JAX_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def _parent_jax_settings() -> dict:
    import jax

    return {name: getattr(jax.config, name) for name in _JAX_SETTINGS if hasattr(jax.config, name)}


def _handle(message, log_fn: Callable, metrics, done: set) -> None:
    if isinstance(message, logging.LogRecord):
        logger = logging.getLogger(message.name)
        if logger.isEnabledFor(message.levelno):  # the level check the record skipped here
            logger.handle(message)
        return
    kind = message[0]
    if kind == "log":
        log_fn(message[1])
    elif kind == "metric":
        if metrics is not None:
            metrics.write(message[1])
    elif kind == "truncate":
        if metrics is not None:
            metrics.truncate(message[1], message[2])
    elif kind == "compile":
        compile_time.add_seconds(message[1], message[2])
    elif kind == "done":
        done.add(message[1])


def _new_pool(ctx, queue, workers: int) -> concurrent.futures.ProcessPoolExecutor:
    level = logging.getLogger().getEffectiveLevel()
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(queue, _parent_jax_settings(), level),
    )


class _Forwarder:
    """The parent's end of the queue: hands each message to ``log_fn``, ``metrics``, the logging
    handlers or ``compile_time``, and waits for calls' results and their last messages."""

    def __init__(self, queue, log_fn: Callable, metrics):
        self.queue, self.log_fn, self.metrics = queue, log_fn, metrics
        self.done: set[int] = set()

    def drain(self, timeout: float) -> bool:
        try:
            _handle(self.queue.get(timeout=timeout), self.log_fn, self.metrics, self.done)
            return True
        except queue_lib.Empty:
            return False

    def wait(self, futures: dict, raise_first: bool) -> tuple[dict, dict]:
        """``{token: future}`` -> ``({token: result}, {token: exception})`` once every call has
        returned and its messages are handled. With ``raise_first`` the first call to fail (in
        completion order) is re-raised at once."""
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        pending = set(futures.values())
        token_of = {f: t for t, f in futures.items()}
        while pending:
            while self.drain(0.1):
                pass
            finished = {f for f in pending if f.done()}
            pending -= finished
            for f in finished:
                error = f.exception()
                if error is not None and raise_first:
                    raise error
                if error is not None:
                    errors[token_of[f]] = error
                else:
                    results[token_of[f]] = f.result()
        # every call has returned; its last messages (sent before it returned) may be queued
        waited = 0.0
        while not set(futures) <= self.done and waited < _FLUSH_SECONDS:
            if not self.drain(0.5):
                waited += 0.5
        while self.drain(0.0):
            pass
        return results, errors


def _stop(pools) -> None:
    """End every worker of ``pools`` now (the executor has no public way to end a running call)."""
    for pool in pools:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def map_in_processes(
    fn: Callable,
    items: Sequence,
    workers: int,
    *,
    log_fn: Callable[[str], Any] = print,
    metrics=None,
) -> list:
    """``[fn(item, log_fn=..., metrics=...) for item in items]``, at most ``workers`` at a time,
    each call in a spawned worker process; what the calls log or record is forwarded here as it
    happens (module docstring). ``fn`` must be picklable (a module-level function or a
    ``functools.partial`` of one); ``metrics`` is a :class:`~metarec.training.runlog.MetricsWriter`
    or None. The first call that raises is re-raised here, after the calls still running stop."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    ctx = multiprocessing.get_context("spawn")
    forward = _Forwarder(ctx.Queue(), log_fn, metrics)
    pool = _new_pool(ctx, forward.queue, min(workers, len(items)) or 1)
    try:
        futures = {
            i: pool.submit(_run_job, fn, item, i, metrics is not None)
            for i, item in enumerate(items)
        }
        results, _ = forward.wait(futures, raise_first=True)
    except BaseException:
        while forward.drain(0.0):  # what the jobs said before it stopped
            pass
        # stop the jobs still running: their error would come minutes later for nothing (each
        # keeps its checkpoints, so a resumed run continues them)
        _stop([pool])
        raise
    pool.shutdown(wait=True)
    return [results[i] for i in range(len(items))]


def _setup_key(setup: Callable, key, token: int):
    _worker.setdefault("state", {})[key] = _run_job(setup, key, token, False)


def _call_key(fn: Callable, key, args: tuple, token: int):
    state = _worker["state"][key]
    return _run_job(lambda s, **kw: fn(s, *args, **kw), state, token, False)


class WorkerGroup:
    """Long-lived spawned workers, each holding the state of some keys (e.g. one seed's prepared
    data), so that many calls on that state pay for building it once.

    ``setup(key, log_fn=, metrics=None)`` builds a key's state in its worker (keys are dealt to
    ``workers`` processes in turn); :meth:`map` then runs ``fn(state, *args, log_fn=,
    metrics=None)`` for every key at once, each in the worker that holds its state, forwarding
    what the calls log as :func:`map_in_processes` does. The state never crosses processes; the
    arguments and results do (pickled). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, setup: Callable, keys: Sequence, workers: int, *, log_fn=print):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.keys = list(keys)
        ctx = multiprocessing.get_context("spawn")
        self._forward = _Forwarder(ctx.Queue(), log_fn, None)
        n = min(workers, len(self.keys)) or 1
        self._pools = [_new_pool(ctx, self._forward.queue, 1) for _ in range(n)]
        self._token = 0
        try:
            self._run([functools.partial(_setup_key, setup, k) for k in self.keys])
        except BaseException:
            self.close(stop=True)
            raise

    def _pool(self, i: int):
        return self._pools[i % len(self._pools)]

    def _run(self, jobs: list) -> list:
        """``jobs``: one ``job(token)`` per key, in key order -> their results; the first error in
        key order is re-raised after every job has returned (the workers stay usable unless one
        died)."""
        try:
            futures = {}
            for i, job in enumerate(jobs):
                futures[self._token] = self._pool(i).submit(job, self._token)
                self._token += 1
            results, errors = self._forward.wait(futures, raise_first=False)
        except BaseException:
            self.close(stop=True)
            raise
        for token in futures:
            if isinstance(errors.get(token), concurrent.futures.process.BrokenProcessPool):
                self.close(stop=True)
                raise errors[token]
        for token in futures:
            if token in errors:
                raise errors[token]
        return [results[t] for t in futures]

    def map(self, fn: Callable, *args) -> list:
        """``[fn(state_of(key), *args, log_fn=...) for key in keys]``, the keys' calls at once in
        their workers; ``fn`` and ``args`` must be picklable."""
        return self._run([functools.partial(_call_key, fn, k, args) for k in self.keys])

    def close(self, stop: bool = False) -> None:
        """End the workers: at once with ``stop``, else after their calls (again: nothing)."""
        if stop:
            _stop(self._pools)
        else:
            for pool in self._pools:
                pool.shutdown(wait=True)
        self._pools = []

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self.close(stop=kind is not None)
