"""Host-side run bookkeeping: progress lines with rate and ETA, metrics to JSONL/CSV (and
TensorBoard when ``tensorboardX`` is importable), run metadata (command, config, package versions,
devices, git commit) and atomic JSON writes.

Everything here runs outside ``jit`` on Python scalars; nothing here is needed by the pure library
functions. Typical use (see :func:`experiments.coldstart.pipeline.run`)::

    writer = MetricsWriter(workdir)  # metrics.jsonl + metrics.csv (+ tb/ if available)
    bar = Progress(total=steps, desc="seed0/maml")
    for step in ...:
        writer.write({"unit": "seed0/maml", "kind": "step", "step": step, "loss": loss})
        bar.update(step, loss=loss)
    bar.close(); writer.close()
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from metarec.training import compile_time

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "chex",
    "orbax-checkpoint",
    "numpy",
    "pandas",
    "ml_collections",
    "absl-py",
    "matplotlib",
)
CSV_FIELDS = (
    "unit",
    "kind",
    "step",
    "epoch",
    "loss",
    "grad_norm",
    "train_loss",
    "val_mae",
    "elapsed",
)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json_atomic(path: str, obj: Any, indent: int | None = 1) -> str:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace`` (a reader never
    sees a half-written file; a killed writer leaves the old file intact). Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def remove_run_files(workdir: str, names) -> list[str]:
    """Delete the files and folders ``names`` (a script's own run files) inside ``workdir``, nothing
    else (``--overwrite``). Returns the names that existed."""
    removed = []
    for name in names:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def read_json(path: str) -> Any:
    """Read a JSON file; a corrupt file raises ``ValueError`` naming it, line and column."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"
            ) from None


# ----------------------------------------------------------------------------------------------
# run metadata
# ----------------------------------------------------------------------------------------------
def package_versions(packages=PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (``"not installed"`` when missing) plus Python's."""
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_commit(path: str | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (this package by default), with ``+dirty``
    when the tree has uncommitted changes; None outside git. Read-only git commands only."""
    here = path or os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(config: dict | None = None, argv: list[str] | None = None) -> dict:
    """Everything needed to reproduce a run: command line, config, package versions, devices, git
    commit, host platform and start time (UTC)."""
    import jax

    argv = list(sys.argv if argv is None else argv)
    return {
        "command": " ".join([os.path.basename(sys.executable), *argv]),
        "argv": argv,
        "config": config,
        "versions": package_versions(),
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------
def format_seconds(s: float) -> str:
    """``75 -> '1m15s'``, ``3700 -> '1h01m'``; ``'?'`` for unknown."""
    if s is None or not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """A progress line with count, rate and ETA for a host-side loop.

    On a terminal the line is redrawn in place (``\\r``) at most every ``min_interval`` seconds; on
    a file or pipe one line is written every ``file_interval`` seconds so logs stay short. ``total``
    may be an upper bound (early stopping): the ETA is then an upper bound too. ``done`` may start
    above 0 (a resumed run): the rate only counts work done by this process.

    The rate (and so the ETA) leaves compilation out: once two updates have been made it counts
    only the units after the first one (the first step of a jitted loop compiles it), and it always
    subtracts the compile seconds that ``compile_seconds`` (default:
    :func:`metarec.training.compile_time.compile_seconds`) saw in its window, e.g. an evaluation
    compiled at the end of the first epoch.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        done: int = 0,
        stream: TextIO | None = None,
        min_interval: float = 0.5,
        file_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        compile_seconds: Callable[[], float] | None = None,
    ):
        self.total, self.desc, self.done = int(total), desc, int(done)
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.compile_seconds = compile_seconds or compile_time.compile_seconds
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = min_interval if self.tty else file_interval
        self.t0 = clock()
        self.start = self.done
        # (time, units done, compile seconds) at creation and at the first update
        self._origin = (self.t0, self.done, self.compile_seconds())
        self._first: tuple[float, int, float] | None = None
        self._last = -math.inf
        self._width = 0

    def rate(self) -> float:
        """Units per second of compute: since the first update once there are units after it, else
        since creation; compile seconds in that window are not counted. 0.0 while unknown."""
        t, n, c = self._origin
        if self._first is not None and self.done > self._first[1]:
            t, n, c = self._first
        dt = (self.clock() - t) - (self.compile_seconds() - c)
        return (self.done - n) / dt if dt > 0 and self.done > n else 0.0

    def eta(self) -> float:
        """Seconds left at the current rate (inf when unknown)."""
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else math.inf

    def line(self, **postfix) -> str:
        """The current progress line."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        extra = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items()
        )
        return (
            f"{self.desc} {self.done}/{self.total} ({pct:3.0f}%) {self.rate():.2f}/s "
            f"elapsed {format_seconds(self.clock() - self.t0)} "
            f"ETA {format_seconds(self.eta())} {extra}"
        ).strip()

    def update(self, done: int | None = None, force: bool = False, **postfix) -> None:
        """Advance by one (or set the count to ``done``); redraw if ``min_interval`` has passed."""
        self.done = self.done + 1 if done is None else int(done)
        now = self.clock()
        if self._first is None and self.done > self.start:
            self._first = (now, self.done, self.compile_seconds())
        if not force and now - self._last < self.interval:
            return
        self._last = now
        text = self.line(**postfix)
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, **postfix) -> None:
        """Draw the final line and end it."""
        self.update(self.done, force=True, **postfix)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def _try_tensorboard(logdir: str):
    try:
        from tensorboardX import SummaryWriter  # type: ignore[import-not-found]
    except ImportError:
        return None
    return SummaryWriter(logdir)


class MetricsWriter:
    """Append metric records to ``workdir/metrics.jsonl`` and ``workdir/metrics.csv`` (fixed columns
    :data:`CSV_FIELDS`, blank when absent), and to TensorBoard under ``workdir/tb`` when
    ``tensorboardX`` is importable (optional; ``tensorboard=False`` turns it off).

    A record is a flat dict with at least ``unit`` (e.g. ``"seed0/maml"``) and ``step``; every other
    numeric field becomes a TensorBoard scalar ``unit/field``. :meth:`truncate` drops one unit's
    records after a step — used on resume, so that steps replayed after a crash are not logged
    twice.
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.csv_path = os.path.join(workdir, "metrics.csv")
        new_csv = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        self._jsonl = open(self.jsonl_path, "a")
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self.tb = _try_tensorboard(os.path.join(workdir, "tb")) if tensorboard else None

    def write(self, record: dict) -> None:
        """Append one record (flushed at once, so a killed run keeps what it logged)."""
        if "unit" not in record or "step" not in record:
            raise ValueError(f"a metrics record needs 'unit' and 'step', got keys {sorted(record)}")
        self._jsonl.write(json.dumps(record, default=_json_default) + "\n")
        self._jsonl.flush()
        self._csv.writerow({k: record.get(k, "") for k in CSV_FIELDS})
        self._csv_file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if (
                    k not in ("unit", "step", "kind")
                    and isinstance(v, (int, float))
                    and not isinstance(v, bool)
                ):
                    self.tb.add_scalar(f"{record['unit']}/{k}", v, int(record["step"]))

    def truncate(self, unit: str, after_step: int) -> int:
        """Drop records of ``unit`` with ``step > after_step`` from both files; returns how many."""
        self._jsonl.close()
        self._csv_file.close()
        kept, dropped = [], 0
        with open(self.jsonl_path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write
                    dropped += 1
                    continue
                if r.get("unit") == unit and int(r.get("step", 0)) > after_step:
                    dropped += 1
                    continue
                kept.append(r)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in kept:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
        for path, text in (
            (self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept)),
            (self.csv_path, buf.getvalue()),
        ):
            tmp = path + ".tmp"
            with open(tmp, "w", newline="") as f:
                f.write(text)
            os.replace(tmp, path)
        self._jsonl = open(self.jsonl_path, "a")
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        return dropped

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``workdir/metrics.jsonl`` (skipping a last line cut by a crash)."""
    path = os.path.join(workdir, "metrics.jsonl")
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


__all__ = [
    "CSV_FIELDS",
    "MetricsWriter",
    "Progress",
    "format_seconds",
    "git_commit",
    "package_versions",
    "read_json",
    "read_metrics",
    "run_metadata",
    "write_json_atomic",
]
