"""Seeded, resumable meta-batches streamed from task shards (:mod:`metarec.data.shards`).

Epoch ``e`` visits this process's tasks in the order
:func:`~metarec.data.tasks.epoch_order` ``(seed, e, n_local)`` in meta-batches of ``meta_batch``
(the incomplete last batch is dropped, one static shape), exactly as
:func:`metarec.training.meta_train.meta_train` visits in-memory tasks. With one process the local
tasks are all tasks in write order, so the batches equal the in-memory ones for the same seed; with
``P`` processes each reads only its own shards and contributes its local batch (the global
meta-batch is the processes' batches side by side, as ``jax.make_array_from_process_local_data``
assembles it).

The whole loader state is :class:`LoaderState` ``(seed, epoch, batch)``: the position after the
last batch handed out. A loader started from a saved state yields the same following batches,
bit for bit, whatever it had read ahead.

Memory is bounded by ``buffer`` meta-batches: with ``buffer == 1`` batches are read and encoded
on demand; with ``buffer > 1`` a background thread reads ahead into a queue of ``buffer - 1``
batches plus the one it is building (reading and encoding overlap the training step; numpy
releases the GIL for the copies).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable

from metarec.data.scenarios import UserSets
from metarec.data.shards import ShardSet
from metarec.data.tasks import Task, epoch_order


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """Where a stream stands: the next batch is batch ``batch`` of epoch ``epoch`` (epochs count
    from 1, as in meta-training). JSON-ready through :meth:`to_dict` / :meth:`from_dict`."""

    seed: int
    epoch: int = 1
    batch: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoaderState:
        return cls(int(d["seed"]), int(d["epoch"]), int(d["batch"]))


@dataclasses.dataclass(frozen=True)
class ShardTasks:
    """Tasks on disk that :func:`metarec.training.meta_train.meta_train` can take in place of an
    in-memory ``Task``: ``num_tasks`` and ``take(rows)`` (the encoded tasks at ``rows``, read on
    demand), so meta-training holds one meta-batch at a time and visits the same batches."""

    shards: ShardSet
    encode: Callable[[UserSets], Task]

    @property
    def num_tasks(self) -> int:
        return self.shards.n_tasks

    def take(self, rows) -> Task:
        return self.encode(self.shards.take(rows))


_END = object()


class MetaBatchStream:
    """Iterate ``(task_batch, state_after)`` over ``shards`` from ``start`` until the end of epoch
    ``epochs`` (None: forever).

    ``encode`` turns the :class:`UserSets` of one meta-batch into the model's :class:`Task` (e.g.
    the cold-start experiment's ``SeedData.encode``); it must be row-wise (a task's encoding must
    not depend on the other tasks of the batch), which :class:`~metarec.data.FeatureEncoder` is.
    ``held_tasks`` / ``peak_held_tasks`` count the tasks the loader holds (read, not yet handed
    out): never more than ``buffer * meta_batch``. Close it (or use ``with``) to stop the thread.
    """

    def __init__(
        self,
        shards: ShardSet,
        encode: Callable[[UserSets], Task],
        *,
        meta_batch: int,
        start: LoaderState,
        epochs: int | None = None,
        buffer: int = 2,
    ):
        if meta_batch < 1 or buffer < 1:
            raise ValueError(f"meta_batch and buffer must be >= 1, got {meta_batch}, {buffer}")
        self.n_batches = shards.n_tasks // meta_batch
        if self.n_batches == 0:
            raise ValueError(
                f"meta_batch={meta_batch} is larger than this process's {shards.n_tasks} tasks"
            )
        if not (start.epoch >= 1 and 0 <= start.batch <= self.n_batches):
            raise ValueError(f"start state {start} outside epochs >= 1, batch 0..{self.n_batches}")
        self.shards, self.encode, self.meta_batch = shards, encode, meta_batch
        self.epochs, self.buffer = epochs, buffer
        self.state = start  # after the last batch handed out
        self.held_tasks = self.peak_held_tasks = 0
        self._lock = threading.Lock()
        self._positions = self._walk(start)
        self._q: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if buffer > 1:
            self._q = queue.Queue(maxsize=buffer - 1)
            self._thread = threading.Thread(target=self._produce, daemon=True)
            self._thread.start()

    def _walk(self, s: LoaderState):
        epoch, batch = s.epoch, s.batch
        while self.epochs is None or epoch <= self.epochs:
            if batch >= self.n_batches:
                epoch, batch = epoch + 1, 0
                continue
            order = epoch_order(s.seed, epoch, self.shards.n_tasks)
            for b in range(batch, self.n_batches):
                rows = order[b * self.meta_batch : (b + 1) * self.meta_batch]
                after = LoaderState(s.seed, epoch, b + 1)
                yield rows, after
            epoch, batch = epoch + 1, 0

    def _count(self, n: int) -> None:
        with self._lock:
            self.held_tasks += n
            self.peak_held_tasks = max(self.peak_held_tasks, self.held_tasks)

    def _read(self, rows) -> Task:
        self._count(len(rows))
        return self.encode(self.shards.take(rows))

    def _produce(self) -> None:
        try:
            for rows, after in self._positions:
                item = (self._read(rows), after)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._q.put((e, None))

    def __iter__(self) -> MetaBatchStream:
        return self

    def __next__(self) -> tuple[Task, LoaderState]:
        if self._q is None:
            rows, after = next(self._positions)
            batch = self._read(rows)
        else:
            batch, after = self._q.get()
            if batch is _END:
                self._q.put((_END, None))
                raise StopIteration
            if isinstance(batch, BaseException):
                raise batch
        self._count(-self.meta_batch)
        self.state = after
        return batch, after

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> MetaBatchStream:
        return self

    def __exit__(self, *_) -> None:
        self.close()
