"""The one resumable trainer behind meta-training, pretraining and the RL agents.

A training loop is cut into *pieces* (a few steps, an epoch, a chunk of RL iterations). The state it
carries is a :class:`LoopState`: device arrays (params, optimizer state, PRNG key, replay buffers,
...) checkpointed with orbax, plus a JSON-able ``host`` dict (counters, histories, early-stopping
state). :func:`run` starts from :func:`restore_or_init` and calls
``piece(state) -> (state, metric)`` until ``state.done``, saving a checkpoint after every piece
(``metric`` feeds the best-checkpoint policy of :class:`~metarec.training.checkpoint.Checkpointer`).
Because the piece boundaries and the PRNG stream are pure functions of the loop state, a run killed
at any point and resumed ends with the same bits as an uninterrupted one.

A piece that meets a non-finite loss raises :class:`NonFiniteLossError` (built by
:func:`non_finite_error`) *before* anything is saved, so the newest checkpoint is the last good
state.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from metarec.training.checkpoint import Checkpointer

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss, gradient or metric. ``step`` is the 1-based step (or
    iteration, or epoch) that failed; ``last_good_step`` the newest checkpoint kept (None if none);
    ``checkpoint_dir`` where it is (None without checkpoints)."""

    def __init__(
        self,
        message: str,
        step: int = 0,
        last_good_step: int | None = None,
        checkpoint_dir: str | None = None,
    ):
        super().__init__(message)
        self.step, self.last_good_step, self.checkpoint_dir = step, last_good_step, checkpoint_dir

    @property
    def iteration(self) -> int:
        """The failed step under the name the RL loops use."""
        return self.step


def non_finite_error(
    what: str, step: int, checkpointer: Checkpointer | None, *, unit: str = "step", hint: str
) -> NonFiniteLossError:
    """The error for a non-finite value at ``step``: ``what`` says where (loop name, metric, value),
    then how to go on, depending on whether a last good checkpoint exists. ``hint`` names the knobs
    to turn (e.g. ``"lower --meta_lr/--inner_lr or set --clip_norm"``)."""
    last = None if checkpointer is None else checkpointer.latest_step()
    if checkpointer is None:
        how = f"no checkpoints were written (pass a --workdir); {hint} and run again"
    elif last is None:
        how = (
            f"no checkpoint was saved yet in {checkpointer.directory}; {hint} and rerun the same "
            "command with --resume (finished parts are kept and skipped)"
        )
    else:
        how = (
            f"the last good checkpoint ({unit} {last}) is kept in {checkpointer.directory}; {hint} "
            "and rerun the same command with --resume to continue from it"
        )
    directory = None if checkpointer is None else checkpointer.directory
    return NonFiniteLossError(f"{what}: {how}.", step, last, directory)


def first_non_finite(metrics: dict) -> tuple[int, str, float] | None:
    """``(index, metric name, value)`` of the first row with a NaN/inf in any metric (arrays with a
    leading step axis), or None when all are finite."""
    first = None
    for name, values in metrics.items():
        a = np.asarray(values, dtype=np.float64)
        flat = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        bad = ~np.isfinite(flat).all(1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            if first is None or i < first[0]:
                first = (i, name, float(flat[i][~np.isfinite(flat[i])][0]))
    return first


@dataclasses.dataclass
class LoopState:
    """Everything a loop carries between pieces.

    ``arrays``: the device pytree that is checkpointed; ``host``: JSON-able host state; ``step``:
    the checkpoint step (strictly increasing from piece to piece); ``done``: the loop has finished;
    ``elapsed``: training seconds of earlier processes (resumed runs), see :attr:`seconds`.
    """

    arrays: PyTree
    host: dict
    step: int = 0
    done: bool = False
    elapsed: float = 0.0
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def seconds(self) -> float:
        """Training seconds so far, summed over resumed processes."""
        return self.elapsed + time.time() - self.started


def fresh_arrays(tree: PyTree) -> PyTree:
    """Restored arrays as fresh host-backed device arrays, so jitted pieces are not compiled again
    for the restored arrays' committed placement."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), tree)


def _canonical(obj) -> Any:
    return json.loads(json.dumps(obj))


def restore_or_init(
    init: Callable[[], LoopState],
    *,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    ident: dict | None = None,
    what: str = "run",
    like: PyTree | None = None,
    need_arrays: bool = True,
) -> tuple[LoopState, int | None]:
    """The newest checkpoint's state when ``resume`` finds one, else ``init()``.

    ``ident`` (JSON-able) is saved with every checkpoint; a checkpoint whose ``ident`` differs is
    refused with ``ValueError`` ("written for another ``what``"). ``like`` is the restore template
    (default: ``init().arrays``); ``need_arrays=False`` skips reading the arrays of a finished loop.
    Returns ``(state, resumed_from)`` where ``resumed_from`` is the checkpoint step or None.
    """
    if checkpointer is None or not resume or checkpointer.latest_step() is None:
        return init(), None
    step = checkpointer.latest_step()
    saved = checkpointer.restore_meta(step)
    ident = _canonical(ident or {})
    old = saved.get("ident", {})
    diff = sorted(k for k in set(ident) | set(old) if ident.get(k) != old.get(k))
    if diff:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {ident.get(k)!r}" for k in diff)
        raise ValueError(
            f"{checkpointer.directory}: checkpoint {step} was written for another {what} "
            f"({detail}); resume with the original settings or use a fresh --workdir"
        )
    arrays = None
    if need_arrays or not saved["done"]:
        template = init().arrays if like is None else like
        arrays = fresh_arrays(checkpointer.restore(step, template)[0])
    state = LoopState(arrays, saved["host"], step, saved["done"], saved["elapsed"])
    return state, step


def save(
    state: LoopState, checkpointer: Checkpointer | None, ident: dict | None, metric=None
) -> None:
    """Checkpoint ``state`` (arrays with orbax, host state and ``ident`` as metadata)."""
    if checkpointer is None:
        return
    meta = {
        "host": state.host,
        "done": state.done,
        "elapsed": state.seconds,
        "ident": _canonical(ident or {}),
    }
    checkpointer.save(state.step, state.arrays, meta, metric=metric)


def run(
    piece: Callable[[LoopState], tuple[LoopState, float | None]],
    state: LoopState,
    *,
    checkpointer: Checkpointer | None = None,
    ident: dict | None = None,
) -> LoopState:
    """Call ``piece`` until ``state.done``, checkpointing after every piece. ``piece`` returns the
    new state and the checkpoint's metric (None: no metric, e.g. a mid-epoch save)."""
    while not state.done:
        state, metric = piece(state)
        save(state, checkpointer, ident, metric)
    return state


__all__ = [
    "LoopState",
    "NonFiniteLossError",
    "first_non_finite",
    "fresh_arrays",
    "non_finite_error",
    "restore_or_init",
    "run",
    "save",
]
