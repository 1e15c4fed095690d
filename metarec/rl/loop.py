"""Resumable training loops for the RL agents: a loop cut into pure pieces, and the host loop that
runs the pieces with checkpoints.

A :class:`Trainer` is two pure functions (optax style): ``init(key, env_params, ...) -> state`` and
``run(state, env_params, start, length) -> (state, metrics)``, which runs iterations
``start .. start + length - 1`` (``length`` static; jit it with ``static_argnames="length"``). The
state is a dict pytree holding everything the loop carries (``params``, ``opt_state``, the loop's
PRNG ``key`` and, for DQN, the target network and replay buffer); the key of iteration ``i`` is
``jax.random.split(state["key"], num_iterations)[i]`` whatever the cut, so running ``0..N`` in one
piece or in any number of pieces gives the same numbers (``tests/test_rl_resume.py`` checks this bit
for bit on CPU). ``make_train`` of :mod:`metarec.rl.ppo`, :mod:`~metarec.rl.dqn` and
:mod:`~metarec.rl.maml` is ``run(init(key), env_params, 0, N)`` in one ``jit``.

:func:`train_checkpointed` is the host loop: pieces of ``every`` iterations; after each piece the
metrics are checked (a non-finite value raises :class:`NonFiniteLossError` *before* anything is
saved, so the newest checkpoint is the last good state), handed to ``on_chunk`` (metrics rows,
progress) and the state is saved with :class:`metarec.training.checkpoint.Checkpointer` (step = iterations
done; meta = the metrics so far, elapsed seconds, ``done``). With ``resume`` it continues from the
newest checkpoint. There is no validation metric during RL training, so only the newest
``keep_last`` checkpoints are kept (``keep_best=0``); the newest is always the final state.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from metarec.training.checkpoint import Checkpointer

PyTree = Any


class Trainer(NamedTuple):
    """A training loop in resumable pieces (see the module docstring)."""

    init: Callable
    run: Callable
    num_iterations: int


def iteration_keys(key: jax.Array, num_iterations: int, start, length: int) -> jax.Array:
    """Keys of iterations ``start .. start + length - 1``: rows of ``split(key, num_iterations)``."""
    return jax.lax.dynamic_slice_in_dim(jax.random.split(key, num_iterations), start, length)


class NonFiniteLossError(FloatingPointError):
    """A training loop produced a non-finite loss (or other training metric). ``iteration`` is the
    1-based iteration that failed; ``last_good_step`` the newest checkpoint kept (None if none);
    ``checkpoint_dir`` where it is (None without checkpoints)."""

    def __init__(self, message: str, iteration: int = 0, last_good_step: int | None = None,
                 checkpoint_dir: str | None = None):  # fmt: skip
        super().__init__(message)
        self.iteration, self.last_good_step, self.checkpoint_dir = iteration, last_good_step, checkpoint_dir


def first_non_finite(metrics: dict) -> tuple[int, str, float] | None:
    """``(index, metric name, value)`` of the first iteration with a NaN/inf in any metric (arrays
    over iterations, leading axis), or None when all are finite."""
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
class LoopResult:
    """What :func:`train_checkpointed` returns. ``state`` is None when ``need_state=False`` and the
    loop was already finished; ``metrics`` are numpy arrays over all iterations (also those of
    earlier, resumed pieces); ``resumed_from`` the checkpoint step continued from (None: fresh)."""

    state: PyTree
    metrics: dict[str, np.ndarray]
    resumed_from: int | None
    seconds: float


def _fresh(tree):
    """Restored arrays as fresh host-backed device arrays, so the jitted pieces are not compiled again."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), tree)


def train_checkpointed(
    run_fn: Callable, init_fn: Callable[[], PyTree], env_params, num_iterations: int, *, every: int = 0,
    checkpointer: Checkpointer | None = None, resume: bool = False, name: str = "",
    on_chunk: Callable[[int, dict], None] | None = None, need_state: bool = True, meta: dict | None = None,
    like: PyTree | None = None,
) -> LoopResult:  # fmt: skip
    """Run ``num_iterations`` iterations of ``run_fn`` (a jitted :attr:`Trainer.run`) in pieces of
    ``every`` (0: one piece), saving the state after each piece.

    Args:
      run_fn: ``(state, env_params, start, length) -> (state, metrics)``.
      init_fn: ``() -> state``, the fresh state (only called when there is nothing to resume).
      like: the restore template (a state or its ``jax.eval_shape``); default ``eval_shape(init_fn)``.
      checkpointer / resume: where to save; continue from the newest checkpoint (a fresh start when
        there is none). A finished loop (checkpoint ``done``) trains nothing.
      name: names the loop in messages (e.g. ``"seed 0, method ppo"``).
      on_chunk: ``(start, metrics)`` after each finite piece, before it is saved (``start`` 0-based).
      need_state: False skips restoring the arrays of a finished loop (only its metrics are read).
      meta: extra JSON-able identity saved with every checkpoint; on resume a checkpoint whose saved
        ``meta`` differs is refused with ``ValueError``.
    Raises:
      NonFiniteLossError: naming the iteration; nothing after the last finite piece is saved.
    """
    every = int(every) if every and every > 0 else num_iterations
    meta = dict(meta or {})
    start, metrics, elapsed, resumed_from, state = 0, {}, 0.0, None, None
    if checkpointer is not None and resume and checkpointer.latest_step() is not None:
        resumed_from = checkpointer.latest_step()
        saved = checkpointer.restore_meta(resumed_from)
        if saved.get("ident") != json.loads(json.dumps(meta)) or saved.get("num_iterations") != num_iterations:
            raise ValueError(
                f"{checkpointer.directory}: checkpoint {resumed_from} was written for another run ({saved.get('ident')}, "
                f"{saved.get('num_iterations')} iterations; now {meta}, {num_iterations}); resume with the "
                "original settings or use a fresh --workdir"
            )
        start, elapsed = int(saved["iteration"]), float(saved["seconds"])
        metrics = {k: np.asarray(v, dtype=saved["dtypes"][k]) for k, v in saved["metrics"].items()}
        if not (saved["done"] and not need_state):
            like = jax.eval_shape(init_fn) if like is None else like
            state = _fresh(checkpointer.restore(resumed_from, like)[0])
    else:
        state = init_fn()
    t0 = time.time()
    while start < num_iterations:
        length = min(every, num_iterations - start)
        new_state, m = run_fn(state, env_params, start, length)
        m = {k: np.asarray(v) for k, v in jax.device_get(m).items()}
        bad = first_non_finite(m)
        if bad is not None:
            i, metric, value = bad
            last = None if checkpointer is None else checkpointer.latest_step()
            if checkpointer is None:
                how = "no checkpoints were written (pass a --workdir); lower the learning rate and run again"
            elif last is None:
                how = (f"no checkpoint of it was saved yet in {checkpointer.directory}; lower the learning rate "
                       "and rerun the same command with --resume (finished parts are kept and skipped)")
            else:
                how = (f"the last good checkpoint (iteration {last}) is kept in {checkpointer.directory}; rerun "
                       "the same command with --resume to continue from it (lower the learning rate if it fails "
                       "again)")  # fmt: skip
            raise NonFiniteLossError(
                f"{name}: non-finite training {metric} ({value}) at iteration {start + i + 1} of {num_iterations}; "
                f"training stopped and nothing after iteration {start} was saved: {how}.",
                start + i + 1, last, None if checkpointer is None else checkpointer.directory,
            )  # fmt: skip
        if on_chunk is not None:
            on_chunk(start, m)
        metrics = {k: np.concatenate([metrics[k], v]) if k in metrics else v for k, v in m.items()}
        state, start = new_state, start + length
        if checkpointer is not None:
            checkpointer.save(start, state, {
                "iteration": start, "num_iterations": num_iterations, "done": start >= num_iterations,
                "seconds": elapsed + time.time() - t0, "ident": meta,
                "metrics": {k: v.tolist() for k, v in metrics.items()},
                "dtypes": {k: str(v.dtype) for k, v in metrics.items()},
            })  # fmt: skip
    return LoopResult(state, metrics, resumed_from, elapsed + time.time() - t0)


__all__ = [
    "LoopResult", "NonFiniteLossError", "Trainer", "first_non_finite", "iteration_keys", "train_checkpointed",
]  # fmt: skip
