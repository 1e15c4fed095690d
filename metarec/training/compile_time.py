"""Seconds this process has spent compiling, read from JAX's own monitoring events.

JAX reports the duration of each stage of turning a function into an executable
(``jax.monitoring`` events, emitted by ``jax._src.dispatch`` / ``pxla`` / ``pjit``): tracing to a
jaxpr, lowering the jaxpr to an MLIR module, and the backend compile (which includes a persistent
cache lookup; a hit makes it short). Their sum is the compile time; everything else is compute.
A cached call (the jit fast path) emits none of them.

The listener is process-wide because JAX's monitoring is: :func:`compile_seconds` installs it once
and returns the running total, and callers take differences (``after - before``). This is the one
piece of module state in the training layer, kept to a float under a lock.
"""

from __future__ import annotations

import threading

#: the monitoring events whose durations add up to compile time (names as in jax._src.dispatch)
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

_lock = threading.Lock()
_installed = {"listener": False}
_by_event = dict.fromkeys(COMPILE_EVENTS, 0.0)
_in_workers = dict.fromkeys(COMPILE_EVENTS, 0.0)
#: short names of the events in :func:`split_seconds`
STAGES = dict(zip(COMPILE_EVENTS, ("trace", "lower", "backend_compile")))


def _listener(event: str, duration_secs: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
        with _lock:
            _by_event[event] += float(duration_secs)


def add_seconds(event: str, duration_secs: float) -> None:
    """Count a compile event of a worker process (:mod:`metarec.training.processes`); the workers'
    seconds are kept apart from this process's (:func:`worker_compile_seconds`), since they
    overlap its wall time instead of filling it."""
    if event in COMPILE_EVENTS:
        with _lock:
            _in_workers[event] += float(duration_secs)


def worker_stage_seconds() -> dict[str, float]:
    """:func:`worker_compile_seconds` per stage (``trace``, ``lower``, ``backend_compile``): a
    worker traces and lowers every program it runs, and the persistent cache can save only the
    backend compile."""
    with _lock:
        return {STAGES[e]: v for e, v in _in_workers.items()}


def worker_compile_seconds() -> float:
    """Compile seconds of this process's worker processes so far, summed over them."""
    return sum(worker_stage_seconds().values())


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling in this process since the first call (which
    installs the listener and returns 0.0, unless something compiled concurrently)."""
    with _lock:
        if not _installed["listener"]:
            import jax  # here, so that importing the run log does not start JAX

            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed["listener"] = True
        return sum(_by_event.values())


def stage_seconds() -> dict[str, float]:
    """The running totals per stage (``trace``, ``lower``, ``backend_compile``; see
    :data:`STAGES`), counted since :func:`compile_seconds` was first called."""
    compile_seconds()
    with _lock:
        return {STAGES[e]: v for e, v in _by_event.items()}


def split_seconds(
    wall_seconds: float,
    compile_before: float,
    stages_before: dict | None = None,
    workers_before: float | None = None,
    worker_stages_before: dict | None = None,
) -> dict:
    """``{"wall_seconds", "compile_seconds", "compute_seconds"}`` of a stretch of ``wall_seconds``
    that began when :func:`compile_seconds` read ``compile_before``; compute is the rest (data,
    training, evaluation, I/O). With ``stages_before`` (:func:`stage_seconds` at the start) also
    ``"compile_stages"``: the seconds of each stage (the persistent cache saves only the backend
    compile; tracing and lowering happen every run). With ``workers_before``
    (:func:`worker_compile_seconds` at the start) also ``"worker_compile_seconds"`` where worker
    processes compiled, and with ``worker_stages_before`` (:func:`worker_stage_seconds` at the
    start) their stages as ``"worker_compile_stages"``."""
    compiled = compile_seconds() - compile_before
    out = {
        "wall_seconds": round(wall_seconds, 3),
        "compile_seconds": round(compiled, 3),
        "compute_seconds": round(max(wall_seconds - compiled, 0.0), 3),
    }
    if stages_before is not None:
        now = stage_seconds()
        out["compile_stages"] = {k: round(now[k] - stages_before[k], 3) for k in now}
    workers_now = worker_stage_seconds()
    workers_total = sum(workers_now.values())
    if workers_before is not None and workers_total > workers_before:
        out["worker_compile_seconds"] = round(workers_total - workers_before, 3)
        if worker_stages_before is not None:
            out["worker_compile_stages"] = {
                k: round(v - worker_stages_before[k], 3) for k, v in workers_now.items()
            }
    return out
