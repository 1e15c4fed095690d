"""Task shards on disk: per-user support/query sets written once as ``.npy``, read back row by row.

A shard folder holds ``shards.json`` (format, widths, field dtypes, and per shard its task count
and a CRC-32 of every file) and one sub-folder ``shard-NNNNN/`` per shard with one ``.npy`` file
per :class:`~metarec.data.scenarios.UserSets` field. What is stored is a task's raw content (item
ids, ratings, masks, optionally timestamps), not its model inputs: the feature lookup of
:class:`~metarec.data.encode.FeatureEncoder` is row-wise and cheap, so it runs per meta-batch in
the loader (:mod:`metarec.data.stream`) and a task costs ~9 bytes per example on disk instead of
~100 for the encoded ``x``.

Why plain ``.npy`` files rather than Grain + ArrayRecord: every task has the same padded shape, so
a field of a shard is one ``[T, width]`` array and a task is one fixed-size row at a known offset
(no per-record serialisation or decoding); numpy is already a dependency; and the resumable,
seeded order is one permutation (:func:`metarec.data.tasks.epoch_order`), shared with the
in-memory path, so the state is ``(seed, epoch, batch)``. Rows are read with ``os.pread`` rather
than through a memory map: a memory map's touched pages count in the process's RSS (a random
epoch touches every page, so RSS would grow to the shards' size), while ``pread`` holds only the
rows of the batch.

:class:`ShardWriter` writes in bounded memory (at most one shard of tasks pending);
``shards.json`` is written last, so an interrupted write leaves no readable folder.
:func:`open_shards` gives a process its own shards (``shards[process_index::process_count]``)
and turns a missing, truncated or corrupt file into one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib

import numpy as np

from metarec.data.scenarios import UserSets

FORMAT = "metarec-task-shards"
VERSION = 1
INDEX = "shards.json"
#: on-disk dtype of every field (checked to round-trip at write time) and the in-memory one
DISK_DTYPES = {"item": np.int32, "rating": np.float32, "mask": np.uint8, "time": np.int32}
MEMORY_DTYPES = {"item": np.int64, "rating": np.float32, "mask": np.float32, "time": np.int64}


class ShardError(ValueError):
    """A shard folder or file that cannot be read as written (message: one line naming it)."""


def _fields(with_time: bool) -> list[str]:
    kinds = ["item", "rating", "mask"] + (["time"] if with_time else [])
    return ["user_id"] + [f"{p}_{k}" for p in ("support", "query") for k in kinds]


def _disk_dtype(field: str):
    return np.int64 if field == "user_id" else DISK_DTYPES[field.split("_", 1)[1]]


def _to_disk(field: str, a: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(a, dtype=_disk_dtype(field))
    if not np.array_equal(out.astype(a.dtype), a):
        raise ValueError(
            f"field {field}: values do not fit the on-disk dtype {np.dtype(_disk_dtype(field))} "
            f"(range {a.min()}..{a.max()})"
        )
    return out


def _crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


class ShardWriter:
    """Append :class:`UserSets` in order; every ``shard_size`` tasks become one shard.

    Support sets are padded to ``support_width`` (one static shape for every shard); query sets
    must be ``query_width`` wide. ``with_time=False`` leaves timestamps out (read back as 0): the
    task models do not read them. ``extra`` is stored in ``shards.json`` as is (e.g. the seed and
    sizes that made the tasks). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        directory: str,
        *,
        support_width: int,
        query_width: int,
        shard_size: int = 65536,
        with_time: bool = True,
        extra: dict | None = None,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if os.path.exists(os.path.join(directory, INDEX)):
            raise FileExistsError(f"{os.path.join(directory, INDEX)} exists: write to a new folder")
        os.makedirs(directory, exist_ok=True)
        self.directory, self.shard_size = directory, shard_size
        self.widths = {"support": support_width, "query": query_width}
        self.fields = _fields(with_time)
        self.extra = extra or {}
        self.shards: list[dict] = []
        self._pending: list[dict[str, np.ndarray]] = []
        self._n_pending = 0

    def add(self, sets: UserSets) -> None:
        """Queue ``sets``' users; full shards are written at once."""
        s = sets.support_item.shape[1]
        if s < self.widths["support"]:
            sets = sets.pad_support(self.widths["support"])
        elif s > self.widths["support"]:
            raise ValueError(f"support width {s} exceeds the shards' {self.widths['support']}")
        if sets.query_item.shape[1] != self.widths["query"]:
            raise ValueError(
                f"query width {sets.query_item.shape[1]} is not the shards' {self.widths['query']}"
            )
        self._pending.append({f: _to_disk(f, getattr(sets, f)) for f in self.fields})
        self._n_pending += sets.n_users
        while self._n_pending >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        cat = {f: np.concatenate([p[f] for p in self._pending]) for f in self.fields}
        rest = {f: a[n:] for f, a in cat.items()}
        name = f"shard-{len(self.shards):05d}"
        os.makedirs(os.path.join(self.directory, name), exist_ok=True)
        crc = {}
        for f, a in cat.items():
            path = os.path.join(self.directory, name, f"{f}.npy")
            np.save(path, a[:n])
            crc[f] = _crc(path)
        self.shards.append({"name": name, "n_tasks": int(n), "crc32": crc})
        self._n_pending -= n
        self._pending = [rest] if self._n_pending else []

    def close(self) -> dict:
        """Write the last (partial) shard and ``shards.json``; returns the index."""
        if self._n_pending:
            self._flush(self._n_pending)
        index = {
            "format": FORMAT,
            "version": VERSION,
            "support_width": self.widths["support"],
            "query_width": self.widths["query"],
            "fields": {f: np.dtype(_disk_dtype(f)).name for f in self.fields},
            "n_tasks": int(sum(s["n_tasks"] for s in self.shards)),
            "shards": self.shards,
            "extra": self.extra,
        }
        path = os.path.join(self.directory, INDEX)
        with open(path + ".tmp", "w") as f:
            json.dump(index, f, indent=1)
        os.replace(path + ".tmp", path)
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def write_shards(sets: UserSets, directory: str, *, shard_size: int, **kwargs) -> dict:
    """Write in-memory ``sets`` as shards (widths from ``sets`` unless given); returns the index."""
    kwargs.setdefault("support_width", sets.support_item.shape[1])
    kwargs.setdefault("query_width", sets.query_item.shape[1])
    writer = ShardWriter(directory, shard_size=shard_size, **kwargs)
    writer.add(sets)
    return writer.close()


def _read_index(directory: str) -> dict:
    path = os.path.join(directory, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no shard index (not a shard folder, or its writing did not finish)"
        )
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable shard index ({e})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ShardError(
            f"{path}: format {index.get('format')!r} v{index.get('version')}, "
            f"expected {FORMAT!r} v{VERSION}"
        )
    return index


@dataclasses.dataclass
class Column:
    """One ``.npy`` file of a shard: rows of ``row_shape`` ``dtype`` from byte ``offset`` on."""

    path: str
    offset: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    _fd: int | None = None

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (one ``pread`` each; the file stays open)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        size = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        raw = b"".join(os.pread(self._fd, size, self.offset + int(i) * size) for i in idx)
        if len(raw) != size * len(idx):
            raise ShardError(f"{self.path}: corrupt shard file (short read)")
        return np.frombuffer(raw, self.dtype).reshape(len(idx), *self.row_shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclasses.dataclass
class ShardSet:
    """One process's shards: ``arrays[k][field]`` is shard ``k``'s column of ``field``; local task
    ``i`` lives in shard ``searchsorted(offsets, i, "right") - 1``."""

    directory: str
    names: list[str]
    arrays: list[dict[str, Column]]
    offsets: np.ndarray  # [n_shards + 1] cumulative task counts
    support_width: int
    query_width: int

    @property
    def n_tasks(self) -> int:
        return int(self.offsets[-1])

    def take(self, idx) -> UserSets:
        """The users at local positions ``idx`` (any order) as an in-memory :class:`UserSets`
        with the in-memory dtypes; only those rows are read from disk."""
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tasks):
            raise IndexError(f"task index out of range 0..{self.n_tasks - 1}")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for f in _fields(with_time=True):
            if f == "user_id":
                shape, dtype = (len(idx),), np.int64
            else:
                prefix, kind = f.split("_", 1)
                width = self.support_width if prefix == "support" else self.query_width
                shape, dtype = (len(idx), width), MEMORY_DTYPES[kind]
            a = np.zeros(shape, dtype)
            if f in self.arrays[0]:
                for k in np.unique(shard):
                    sel = shard == k
                    a[sel] = self.arrays[k][f].rows(idx[sel] - self.offsets[k])
            out[f] = a
        return UserSets(**out)

    def close(self) -> None:
        """Close the open shard files (reading again reopens them)."""
        for fields in self.arrays:
            for col in fields.values():
                col.close()


def check_process(process_index, process_count) -> None:
    """One error line unless ``0 <= process_index < process_count`` are ints."""
    for name, v in (("process_index", process_index), ("process_count", process_count)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} with process_count={process_count}: need "
            "process_count >= 1 and 0 <= process_index < process_count"
        )


def open_shards(
    directory: str, process_index: int = 0, process_count: int = 1, *, verify: bool = False
) -> ShardSet:
    """This process's shards of ``directory``: shards ``process_index::process_count``, in order.

    Every file's header is read and checked against the index (shape, dtype, file size);
    ``verify`` also compares each file's CRC-32 (reads every byte once). Errors
    are one line naming the file or the argument."""
    check_process(process_index, process_count)
    index = _read_index(directory)
    shards = index["shards"][process_index::process_count]
    if not shards:
        raise ValueError(
            f"process_index={process_index}: {directory} has {len(index['shards'])} shard(s), too "
            f"few for process_count={process_count} (write at least one shard per process)"
        )
    widths = {"support": index["support_width"], "query": index["query_width"]}
    arrays = []
    for s in shards:
        fields = {}
        for f, dtype in index["fields"].items():
            path = os.path.join(directory, s["name"], f"{f}.npy")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: shard file missing")
            try:
                a = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ShardError(f"{path}: corrupt shard file ({e})") from None
            shape = (s["n_tasks"],) if f == "user_id" else (s["n_tasks"], widths[f.split("_")[0]])
            if a.shape != shape or a.dtype != np.dtype(dtype):
                raise ShardError(
                    f"{path}: corrupt shard file (shape {a.shape} {a.dtype}, index says {shape} "
                    f"{dtype})"
                )
            if verify and _crc(path) != s["crc32"][f]:
                raise ShardError(f"{path}: corrupt shard file (CRC-32 differs from {INDEX})")
            fields[f] = Column(path, int(a.offset), a.shape[1:], a.dtype)
            del a  # the header and size check was all the memory map was for
        arrays.append(fields)
    counts = [s["n_tasks"] for s in shards]
    return ShardSet(
        directory=directory,
        names=[s["name"] for s in shards],
        arrays=arrays,
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        support_width=widths["support"],
        query_width=widths["query"],
    )


def read_index(directory: str) -> dict:
    """``shards.json`` of ``directory`` (checked format); e.g. its ``extra`` and ``n_tasks``."""
    return _read_index(directory)
