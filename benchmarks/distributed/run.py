"""The problem and the training loop of the multi-process launcher, shared with its test.

A small MeLU on synthetic tasks (:func:`metarec.data.make_synthetic_tasks`, the same on every
process for the same seed), one of the registry's meta-learners, Adam. Step ``s`` trains on the
meta-batch of tasks ``s*B .. (s+1)*B - 1``; with a mesh every process loads only its own rows of
it (:func:`metarec.training.distributed.process_rows`), without one the whole batch is used on
this process: the reference that the multi-process run must reproduce.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarec import meta
from metarec.data import make_synthetic_tasks
from metarec.data.tasks import index_tasks
from metarec.meta.step import make_meta_step
from metarec.models import melu
from metarec.training import distributed


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one run trains: learner, meta-batch size, steps, task sizes, model width, seed."""

    learner: str = "maml"
    meta_batch: int = 8
    steps: int = 3
    support: int = 8
    query: int = 4
    inner_steps: int = 2
    width: int = 16
    seed: int = 0

    def validate(self) -> None:
        if self.learner not in meta.LEARNERS:
            raise ValueError(f"learner={self.learner!r}; allowed: {', '.join(meta.LEARNERS)}")
        for name in ("meta_batch", "steps", "support", "query", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def train(setup: Setup, mesh=None) -> dict:
    """Run ``setup.steps`` meta-steps. Returns the final meta-parameters (host numpy, flattened to
    ``{path: array}``), the rows of every meta-batch this process fed, the losses, and the seconds
    of the first step (compilation) and of the rest. With ``mesh`` (global, after
    :func:`~metarec.training.distributed.initialize`) this process feeds only its rows."""
    setup.validate()
    b = setup.meta_batch
    rows = slice(0, b) if mesh is None else distributed.process_rows(b, mesh)
    n_items = max(50, 2 * (setup.support + setup.query))
    tasks, spec, _ = make_synthetic_tasks(
        setup.seed,
        n_users=setup.meta_batch * setup.steps,
        n_items=n_items,
        n_support=setup.support,
        n_query=setup.query,
    )
    init_fn, apply_fn = melu.make_melu(spec, embed_dim=8, hidden=(setup.width, setup.width))
    learner = meta.make_learner(
        setup.learner,
        apply_fn,
        inner_steps=setup.inner_steps,
        inner_lr=0.05,
        adapt_mask=melu.adapt_filter("decision"),
    )
    optimizer = optax.adam(1e-2)
    # one compiled program for the initialisation instead of hundreds of op-by-op dispatches
    init = jax.jit(lambda k: (lambda p: (p, optimizer.init(p)))(learner.init(init_fn(k))))
    params, opt_state = jax.device_get(init(jax.random.PRNGKey(setup.seed)))
    step = make_meta_step(learner, optimizer, mesh=mesh)
    if mesh is None:
        params, opt_state = jax.device_put((params, opt_state))
    else:
        params, opt_state = distributed.replicate((params, opt_state), mesh)
    losses, times = [], []
    for s in range(setup.steps):
        t0 = time.perf_counter()
        local = index_tasks(tasks, np.arange(s * b, (s + 1) * b)[rows])
        weights = np.ones(rows.stop - rows.start, np.float32)
        if mesh is None:
            batch, weights = jax.tree_util.tree_map(jnp.asarray, (local, weights))
        else:
            batch, weights = distributed.global_batch((local, weights), mesh)
        params, opt_state, m = step(params, opt_state, batch, weights)
        losses.append(float(distributed.to_host(m["loss"])))
        times.append(time.perf_counter() - t0)
    flat = jax.tree_util.tree_flatten_with_path(distributed.to_host(params))[0]
    return {
        "params": {jax.tree_util.keystr(p): np.asarray(a) for p, a in flat},
        "rows": [rows.start, rows.stop],
        "losses": losses,
        "first_step_s": times[0],
        "other_steps_s": float(sum(times[1:])),
    }
