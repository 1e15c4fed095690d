"""The RL agents' training loops in resumable pieces, run by the one trainer of
:mod:`metarec.training.trainer`.

A :class:`Trainer` is two pure functions (optax style): ``init(key, env_params, ...) -> state`` and
``run(state, env_params, start, length) -> (state, metrics)``, which runs iterations
``start .. start + length - 1`` (``length`` static; jit it with ``static_argnames="length"``). The
state is a dict pytree holding everything the loop carries (``params``, ``opt_state``, the loop's
PRNG ``key`` and, for DQN, the target network and replay buffer); the key of iteration ``i`` is
``jax.random.split(state["key"], num_iterations)[i]`` whatever the cut, so running ``0..N`` in one
piece or in any number of pieces gives the same numbers (the RL loop tests check this bit for bit on
CPU). ``make_train`` of :mod:`metarec.rl.ppo`, :mod:`~metarec.rl.dqn` and :mod:`~metarec.rl.maml` is
``run(init(key), env_params, 0, N)`` in one ``jit``.

:func:`train_checkpointed` runs such a loop with :func:`metarec.training.trainer.run`: pieces of
``every`` iterations; after each piece the metrics are checked (a non-finite value raises
:class:`~metarec.training.trainer.NonFiniteLossError` *before* anything is saved, so the newest
checkpoint is the last good state), handed to ``on_chunk`` (metrics rows, progress) and the state is
checkpointed (step = iterations done; host state = the metrics so far). There is no validation
metric during RL training, so checkpoints carry no metric: keep them with ``keep_best=0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from metarec.training import trainer

if TYPE_CHECKING:  # pragma: no cover
    from metarec.training.checkpoint import Checkpointer

PyTree = Any


class Trainer(NamedTuple):
    """A training loop in resumable pieces (see the module docstring)."""

    init: Callable
    run: Callable
    num_iterations: int


def iteration_keys(key: jax.Array, num_iterations: int, start, length: int) -> jax.Array:
    """Keys of iterations ``start .. start + length - 1``: rows of
    ``split(key, num_iterations)``."""
    return jax.lax.dynamic_slice_in_dim(jax.random.split(key, num_iterations), start, length)


@dataclasses.dataclass
class LoopResult:
    """What :func:`train_checkpointed` returns. ``state`` is None when ``need_state=False`` and the
    loop was already finished; ``metrics`` are numpy arrays over all iterations (also those of
    earlier, resumed pieces); ``resumed_from`` the checkpoint step continued from (None: fresh)."""

    state: PyTree
    metrics: dict[str, np.ndarray]
    resumed_from: int | None
    seconds: float


def _host_metrics(metrics: dict[str, np.ndarray]) -> dict:
    """Metrics as JSON-able host state (lists and dtypes: float32 values round-trip exactly)."""
    return {
        "metrics": {k: v.tolist() for k, v in metrics.items()},
        "dtypes": {k: str(v.dtype) for k, v in metrics.items()},
    }


def _metrics_of(host: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=host["dtypes"][k]) for k, v in host["metrics"].items()}


def train_checkpointed(
    run_fn: Callable,
    init_fn: Callable[[], PyTree],
    env_params,
    num_iterations: int,
    *,
    every: int = 0,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    name: str = "",
    on_chunk: Callable[[int, dict], None] | None = None,
    need_state: bool = True,
    meta: dict | None = None,
    like: PyTree | None = None,
) -> LoopResult:
    """Run ``num_iterations`` iterations of ``run_fn`` (a jitted :attr:`Trainer.run`) in pieces of
    ``every`` (0: one piece), checkpointing the state after each piece.

    Args:
      run_fn: ``(state, env_params, start, length) -> (state, metrics)``.
      init_fn: ``() -> state``, the fresh state (only called when there is nothing to resume).
      like: the restore template (a state or its ``jax.eval_shape``); default
        ``eval_shape(init_fn)``.
      checkpointer / resume: where to save; continue from the newest checkpoint (a fresh start when
        there is none). A finished loop (checkpoint ``done``) trains nothing.
      name: names the loop in messages (e.g. ``"seed 0, method ppo"``).
      on_chunk: ``(start, metrics)`` after each finite piece, before it is saved (``start``
        0-based).
      need_state: False skips restoring the arrays of a finished loop (only its metrics are read).
      meta: extra JSON-able identity saved with every checkpoint; on resume a checkpoint written
        for another identity (or another ``num_iterations``) is refused with ``ValueError``.
    Raises:
      NonFiniteLossError: naming the iteration; nothing after the last finite piece is saved.
    """
    every = int(every) if every and every > 0 else num_iterations
    ident = {**(meta or {}), "num_iterations": num_iterations}

    def init() -> trainer.LoopState:
        return trainer.LoopState(init_fn(), _host_metrics({}), done=num_iterations <= 0)

    if like is None and resume and checkpointer is not None:
        like = jax.eval_shape(init_fn)
    state, resumed_from = trainer.restore_or_init(
        init,
        checkpointer=checkpointer,
        resume=resume,
        ident=ident,
        like=like,
        need_arrays=need_state,
    )

    def piece(state: trainer.LoopState) -> tuple[trainer.LoopState, None]:
        start = state.step
        length = min(every, num_iterations - start)
        arrays, m = run_fn(state.arrays, env_params, start, length)
        m = {k: np.asarray(v) for k, v in jax.device_get(m).items()}
        bad = trainer.first_non_finite(m)
        if bad is not None:
            i, metric, value = bad
            what = (
                f"{name}: non-finite training {metric} ({value}) at iteration {start + i + 1} of "
                f"{num_iterations}; training stopped and nothing after iteration {start} was saved"
            )
            hint = "lower the learning rate"
            raise trainer.non_finite_error(
                what, start + i + 1, checkpointer, unit="iteration", hint=hint
            )
        if on_chunk is not None:
            on_chunk(start, m)
        old = _metrics_of(state.host)
        metrics = {k: np.concatenate([old[k], v]) if k in old else v for k, v in m.items()}
        end = start + length
        new = trainer.LoopState(
            arrays, _host_metrics(metrics), end, end >= num_iterations, state.elapsed, state.started
        )
        return new, None

    state = trainer.run(piece, state, checkpointer=checkpointer, ident=ident)
    return LoopResult(state.arrays, _metrics_of(state.host), resumed_from, state.seconds)


__all__ = ["LoopResult", "Trainer", "iteration_keys", "train_checkpointed"]
