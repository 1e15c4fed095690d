"""User-level differentially private meta-training, on the one resumable trainer.

:func:`private_train` runs a fixed number of steps of a DP meta-step
(:func:`metarec.meta.private.make_dp_meta_step`). Step ``s`` draws fresh tasks (one per training
user) from ``pool(s)``, includes every user independently with probability ``sampling_rate``
(:func:`metarec.data.poisson.poisson_sample`, seeded by ``(sampler_seed, s)``, padded to a fixed
capacity) and takes one private step on the sampled users. The released parameters are the LAST
ones: the number of steps is fixed in advance, so the accountant's
``steps``-fold composition covers everything training released. Validation users (a public,
held-out selection set, not part of the private data) are scored every ``eval_every`` steps for
monitoring only; nothing chooses among the iterates.

The privacy spent, ``epsilon`` at ``delta`` for ``steps`` Poisson-sampled Gaussian steps
(:mod:`metarec.meta.accounting`), is part of the result. The guarantee is user-level: adding or
removing one training user (all their ratings) changes the distribution of the released parameters
by at most ``(epsilon, delta)``. Training metrics (losses, realised batch sizes, clipped fractions)
read the private batches: they are operator logs, not released outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metarec.data.poisson import poisson_capacity, poisson_sample
from metarec.data.tasks import Task, check_finite_tasks, index_tasks
from metarec.meta import accounting
from metarec.training import trainer
from metarec.training.checkpoint import Checkpointer, tree_digest
from metarec.training.meta_train import predict_tasks, score
from metarec.training.runlog import MetricsWriter, Progress


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
    """The private mechanism of a run: per-user ``l2_clip`` (``inf`` with ``noise_multiplier=0``:
    the non-private reference), Gaussian ``noise_multiplier``, Poisson ``sampling_rate``, the number
    of ``steps``, the ``delta`` epsilon is reported at and the accountant (``"rdp"``/``"pld"``)."""

    l2_clip: float
    noise_multiplier: float
    sampling_rate: float
    steps: int
    delta: float
    accountant: str = "rdp"

    def epsilon(self) -> float:
        """Epsilon at ``delta`` after ``steps`` steps (``inf`` without noise)."""
        return accounting.epsilon(
            self.noise_multiplier, self.sampling_rate, self.steps, self.delta, self.accountant
        )


@dataclasses.dataclass
class PrivateResult:
    """What :func:`private_train` returns. ``params``: the last meta-parameters (released);
    ``history``: one record per evaluation (step, mean training loss since the previous one,
    validation MAE, seconds); ``epsilon`` at ``settings.delta``; ``n_users`` the users that can be
    sampled; ``capacity`` the padded batch; ``mean_sampled`` the realised batch size on average;
    ``truncated`` sampled users that did not fit the capacity (expected 0); ``mean_clipped`` the
    average fraction of sampled users whose gradient was clipped; ``dropped`` sampled users whose
    gradient was non-finite (contributed zeros)."""

    params: Any
    history: list[dict]
    settings: PrivacySettings
    epsilon: float
    n_users: int
    capacity: int
    steps: int
    seconds: float
    mean_sampled: float
    truncated: int
    mean_clipped: float
    dropped: int
    final_val_mae: float
    resumed_from: int | None = None
    params_sha256: str = ""


def private_train(
    step: Callable,
    optimizer,
    eval_fn: Callable,
    learner,
    init_params,
    pool: Callable[[int], Task] | Task,
    val: Task,
    settings: PrivacySettings,
    key,
    scale,
    *,
    capacity: int | None = None,
    chunk_size: int = 1,
    eval_every: int = 0,
    eval_chunk: int = 64,
    k: int = 3,
    ckpt_every: int = 0,
    log_every: int = 0,
    log_fn: Callable | None = None,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    metrics: MetricsWriter | None = None,
    unit: str = "private",
    progress: bool = False,
) -> PrivateResult:
    """``settings.steps`` private steps of ``step`` (``make_dp_meta_step`` built with
    ``optimizer``); returns the last parameters with their privacy cost.

    ``pool`` is ``step index -> Task`` with one task per training user, the same users in the same
    order at every step (e.g. ``SeedData.train_tasks("resample")``: fresh support/query draws per
    step), or fixed tasks. ``capacity`` (default :func:`poisson_capacity` rounded to
    ``chunk_size``) is the padded batch. ``eval_every`` (0: only at the end) scores ``val``;
    checkpoints every ``ckpt_every`` steps (and at every evaluation and the end); with ``resume``
    a run continues from its newest checkpoint and ends bit-identical to an uninterrupted one.
    """
    pool_fn = pool if callable(pool) else (lambda s: pool)
    check_finite_tasks(val, f"{unit}: validation tasks")
    n_users = int(pool_fn(1).num_tasks)
    q, total = float(settings.sampling_rate), int(settings.steps)
    if total < 1:
        raise ValueError(f"{unit}: steps must be >= 1, got {total}")
    cap = capacity or poisson_capacity(n_users, q, multiple=chunk_size)
    sampler_seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    ident = {
        "sampler_seed": sampler_seed,
        "n_users": n_users,
        "capacity": cap,
        "settings": dataclasses.asdict(settings),
    }
    bounds = sorted(
        {total}
        | ({s for s in range(eval_every, total, eval_every)} if eval_every else set())
        | ({s for s in range(ckpt_every, total, ckpt_every)} if ckpt_every else set())
    )

    def init() -> trainer.LoopState:
        params = learner.init(init_params)
        arrays = {"params": params, "opt_state": optimizer.init(params), "key": key}
        host = {
            "losses": [],
            "history": [],
            "n_sampled": 0,
            "truncated": 0,
            "clipped": 0.0,
            "dropped": 0,
            "unit": unit,
        }
        return trainer.LoopState(arrays, host)

    state, resumed_from = trainer.restore_or_init(
        init, checkpointer=checkpointer, resume=resume, ident=ident, what="private run"
    )
    if resumed_from is not None:
        if metrics is not None:
            metrics.truncate(unit, state.step)
        if log_fn:
            log_fn(f"  {unit}: resumed from checkpoint step {state.step} of {total}")
    bar = Progress(total, desc=unit, done=state.step) if progress and not state.done else None

    def evaluate(params) -> float:
        out = predict_tasks(eval_fn, params, val, eval_chunk)
        return float(score(out["pred"], val, scale, k)["mae"])

    def piece(state: trainer.LoopState) -> tuple[trainer.LoopState, float | None]:
        h = state.host
        params, opt_state, key_ = (state.arrays[n] for n in ("params", "opt_state", "key"))
        s = state.step
        end = next(b for b in bounds if b > s)
        while s < end:
            s += 1
            tasks_all = pool_fn(s)
            if tasks_all.num_tasks != n_users:
                raise ValueError(
                    f"{unit}: step {s} drew {tasks_all.num_tasks} tasks, not {n_users}"
                )
            draw = poisson_sample(np.random.default_rng([sampler_seed, s]), n_users, q, cap)
            tasks = jax.tree_util.tree_map(jnp.asarray, index_tasks(tasks_all, draw.indices))
            key_, sub = jax.random.split(key_)
            new_params, new_opt, m = step(params, opt_state, tasks, jnp.asarray(draw.weights), sub)
            if not bool(m["finite"]):
                if bar is not None:
                    bar.close()
                raise trainer.non_finite_error(
                    f"{unit}: non-finite meta-loss or gradient at step {s} of {total} "
                    f"(loss {float(m['loss'])}); training stopped and nothing after step {s - 1} "
                    "was saved",
                    s,
                    checkpointer,
                    hint="lower --config.meta_lr or --config.l2_clip",
                )
            params, opt_state = new_params, new_opt
            loss = float(m["loss"])
            h["losses"].append(loss)
            h["n_sampled"] += draw.n_sampled
            h["truncated"] += draw.truncated
            h["clipped"] += float(m["clipped"])
            h["dropped"] += int(m["dropped"])
            if draw.truncated and log_fn:
                log_fn(f"  {unit}: step {s} sampled {draw.n_sampled} > capacity {cap} (truncated)")
            if metrics is not None and log_every and s % log_every == 0:
                metrics.write(
                    {
                        "unit": unit,
                        "kind": "step",
                        "step": s,
                        "loss": loss,
                        "grad_norm": float(m["grad_norm"]),
                        "sampled": draw.n_sampled,
                        "clipped": float(m["clipped"]),
                        "elapsed": state.seconds,
                    }
                )
            if bar is not None:
                bar.update(loss=loss)
        metric = None
        if s == total or (eval_every and s % eval_every == 0):
            val_mae = evaluate(params)
            rec = {
                "step": s,
                "train_loss": float(np.mean(h["losses"])) if h["losses"] else math.nan,
                "val_mae": val_mae,
                "seconds": state.seconds,
            }
            h["history"].append(rec)
            h["losses"] = []
            if metrics is not None:
                metrics.write({"unit": unit, "kind": "eval", **rec, "elapsed": state.seconds})
            if log_fn:
                log_fn(
                    f"  {unit} step {s:5d} train_loss {rec['train_loss']:.4f} val_mae {val_mae:.4f}"
                )
            metric = val_mae
        state.arrays = {"params": params, "opt_state": opt_state, "key": key_}
        state.step, state.done = s, s >= total
        return state, metric

    state = trainer.run(piece, state, checkpointer=checkpointer, ident=ident)
    if bar is not None:
        bar.close()
    h, params = state.host, state.arrays["params"]
    return PrivateResult(
        params=params,
        history=h["history"],
        settings=settings,
        epsilon=settings.epsilon(),
        n_users=n_users,
        capacity=cap,
        steps=state.step,
        seconds=state.seconds,
        mean_sampled=h["n_sampled"] / max(state.step, 1),
        truncated=int(h["truncated"]),
        mean_clipped=h["clipped"] / max(state.step, 1),
        dropped=int(h["dropped"]),
        final_val_mae=float(h["history"][-1]["val_mae"]),
        resumed_from=resumed_from,
        params_sha256=tree_digest(params),
    )
