"""The problem and the training loops of the multi-process launcher, shared with its test.

A small MeLU on synthetic tasks (:func:`metarec.data.make_synthetic_tasks`, the same on every
process for the same seed), one of the registry's meta-learners. Two loops:

* :func:`train` (``loop="hand"``): Adam, step ``s`` trains on the meta-batch of tasks
  ``s*B .. (s+1)*B - 1``; with a mesh every process loads only its own rows of it
  (:func:`metarec.training.distributed.process_rows`), without one the whole batch is used on
  this process: the reference that the multi-process run must reproduce.
* :func:`train_meta` (``loop="meta_train"``): the library's
  :func:`metarec.training.meta_train.meta_train` on ``B * steps`` training users (``steps``
  meta-batches per epoch) and ``val_users`` validation users, with early stopping, checkpoints
  and resume; with a mesh spanning processes it feeds each process its rows itself. With
  ``source="reader"`` the training tasks are read on demand through the interface of tasks on
  disk (:class:`~metarec.data.stream.ShardTasks`), counting the rows this process reads. With
  ``dataset="ml-100k"`` it trains the cold-start experiment's model and learner
  (:mod:`experiments.coldstart`, default config) on MovieLens-100K training users, a fresh draw
  of tasks every epoch, early-stopped on the validation users (no test scenario is built).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks.meta_step.problems import melu_learner
from metarec import meta
from metarec.data import load_dataset, make_synthetic_tasks
from metarec.data.stream import ShardTasks
from metarec.data.tasks import index_tasks
from metarec.meta.step import make_eval_fn, make_meta_step
from metarec.training import distributed
from metarec.training.checkpoint import Checkpointer
from metarec.training.meta_train import make_step, meta_train
from metarec.training.runlog import MetricsWriter

LOOPS = ("hand", "meta_train")
SOURCES = ("memory", "reader")
DATASETS = ("synthetic", "ml-100k")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one run trains: the loop, learner, meta-batch size, steps (per epoch with
    ``loop="meta_train"``), task sizes, model width, seed; epochs, patience, validation users and
    the checkpoint interval (0: epoch ends only) and where training tasks are read from (in
    memory, or ``reader``: on demand, see :class:`RowsRead`) and the dataset (``synthetic``, or
    ``ml-100k``: the cold-start experiment's tasks and model, from its default config, which then
    sets the task sizes, model, inner loop and validation users) of ``loop="meta_train"``."""

    loop: str = "hand"
    learner: str = "maml"
    meta_batch: int = 8
    steps: int = 3
    support: int = 8
    query: int = 4
    inner_steps: int = 2
    width: int = 16
    seed: int = 0
    epochs: int = 2
    patience: int = 2
    val_users: int = 8
    ckpt_every: int = 0
    source: str = "memory"
    dataset: str = "synthetic"

    def validate(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"loop={self.loop!r}; allowed: {', '.join(LOOPS)}")
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}; allowed: {', '.join(SOURCES)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.dataset != "synthetic" and (self.loop != "meta_train" or self.source != "memory"):
            raise ValueError(f"dataset={self.dataset!r} needs loop=meta_train and source=memory")
        if self.learner not in meta.LEARNERS:
            raise ValueError(f"learner={self.learner!r}; allowed: {', '.join(meta.LEARNERS)}")
        for name in ("meta_batch", "steps", "support", "query", "width", "epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_users", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def problem(self, n_users: int):
        """``(tasks, init_fn, apply_fn, learner)``: ``n_users`` synthetic tasks and the model."""
        n_items = max(50, 2 * (self.support + self.query))
        tasks, spec, _ = make_synthetic_tasks(
            self.seed, n_users=n_users, n_items=n_items, n_support=self.support, n_query=self.query
        )
        init_fn, apply_fn, learner = melu_learner(
            spec, self.learner, inner_steps=self.inner_steps, width=self.width, embed_dim=8
        )
        return tasks, init_fn, apply_fn, learner


def train(setup: Setup, mesh=None) -> dict:
    """Run ``setup.steps`` meta-steps. Returns the final meta-parameters (host numpy, flattened to
    ``{path: array}``), the rows of every meta-batch this process fed, the losses, and the seconds
    of the first step (compilation) and of the rest. With ``mesh`` (global, after
    :func:`~metarec.training.distributed.initialize`) this process feeds only its rows."""
    setup.validate()
    b = setup.meta_batch
    rows = slice(0, b) if mesh is None else distributed.process_rows(b, mesh)
    tasks, init_fn, _, learner = setup.problem(setup.meta_batch * setup.steps)
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


def _flat(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {jax.tree_util.keystr(p): np.asarray(a) for p, a in flat}


def train_meta(
    setup: Setup,
    mesh=None,
    *,
    workdir: str | None = None,
    resume: bool = False,
    stop_after_steps: int = 0,
    log_fn: Callable | None = None,
) -> dict:
    """Run :func:`~metarec.training.meta_train.meta_train` on the setup's problem (synthetic:
    AdamW at 1e-2, no weight decay; validation MAE on ``setup.val_users`` users). With
    ``workdir``: checkpoints in ``<workdir>/ckpt`` (every process takes part; ``resume`` continues
    from them) and metrics in ``<workdir>`` (process 0). ``stop_after_steps`` > 0 raises
    :class:`Stopped` before that meta-step + 1, as a killed run would stop (for the resume check).

    Returns the best meta-parameters (host numpy, flattened to ``{path: array}``), the history,
    best epoch and validation MAE, steps, the checkpoint step resumed from, seconds, digest and
    (``source="reader"``) how many task rows this process read."""
    setup.validate()
    make = _ml100k if setup.dataset == "ml-100k" else _synthetic
    learner, step, eval_fn, params0, train_tasks, val, cfg, key, scale = make(setup, mesh)
    reader = RowsRead(train_tasks) if setup.source == "reader" else None
    if reader is not None:
        train_tasks = ShardTasks(reader, encode=lambda t: t)
    if stop_after_steps:
        step = _stopping(step, stop_after_steps)
    lead = jax.process_index() == 0
    ck = Checkpointer(f"{workdir}/ckpt") if workdir else None
    metrics = MetricsWriter(workdir, tensorboard=False) if workdir and lead else None
    try:
        res = meta_train(
            learner,
            step,
            eval_fn,
            params0,
            train_tasks,
            val,
            cfg,
            key,
            scale,
            log_fn=log_fn,
            mesh=mesh,
            checkpointer=ck,
            resume=resume,
            metrics=metrics,
            unit=setup.learner,
        )
    finally:
        if ck is not None:
            ck.close()
        if metrics is not None:
            metrics.close()
    return {
        "params": _flat(res.params),
        "history": res.history,
        "best_epoch": res.best_epoch,
        "best_val_mae": res.best_val_mae,
        "steps": res.steps,
        "resumed_from": res.resumed_from,
        "seconds": res.seconds,
        "params_sha256": res.params_sha256,
        "rows_read": None if reader is None else len(reader.rows),
    }


def _synthetic(setup: Setup, mesh) -> tuple:
    n_train = setup.meta_batch * setup.steps
    tasks, init_fn, apply_fn, learner = setup.problem(n_train + setup.val_users)
    cfg = ml_collections.ConfigDict(
        dict(
            meta_lr=1e-2,
            weight_decay=0.0,
            clip_norm=0.0,
            chunk_size=0,
            meta_batch=setup.meta_batch,
            epochs=setup.epochs,
            patience=setup.patience,
            ckpt_every=setup.ckpt_every,
            log_every=1,
            eval_chunk=max(setup.val_users, 1),
            k=3,
        )
    )
    k_init, k_train = jax.random.split(jax.random.PRNGKey(setup.seed))
    return (
        learner,
        make_step(learner, cfg, mesh=mesh),
        make_eval_fn(learner, apply_fn),
        jax.jit(init_fn)(k_init),  # one program instead of many op-by-op dispatches
        index_tasks(tasks, slice(0, n_train)),
        index_tasks(tasks, slice(n_train, None)),
        cfg,
        k_train,
        (1.0, 5.0),
    )


def _ml100k(setup: Setup, mesh) -> tuple:
    """The cold-start experiment's first meta-learning unit on MovieLens-100K, as its pipeline
    builds it (default config; training users drawn afresh every epoch)."""
    from experiments.coldstart import build  # the experiment's problem, only when asked for
    from experiments.coldstart.configs import default as coldstart_config
    from experiments.coldstart.tables import deployed, initial_params

    cfg = coldstart_config.get_config()
    cfg.meta_batch, cfg.epochs, cfg.patience = setup.meta_batch, setup.epochs, setup.patience
    # all_devices: the mesh over every device of every process, as the launcher's
    cfg.ckpt_every, cfg.all_devices = setup.ckpt_every, mesh is not None
    data = load_dataset("ml-100k")
    sd = build.prepare_seed(data, setup.seed, cfg, test=False)  # no test user is read
    fns = build.Compiled(cfg)
    spec = sd.encoder.spec
    _, k_init, k_train = jax.random.split(jax.random.PRNGKey(setup.seed), 3)
    learner = fns.learner(spec, setup.learner)
    params0 = initial_params(fns.model(spec)[0], k_init, sd, cfg, setup.seed)
    deploy = deployed(sd, cfg, setup.seed)
    evaluate = fns.eval(spec, setup.learner)

    def eval_fn(meta_params, tasks):
        return evaluate(deploy(meta_params), tasks)

    train = sd.train_tasks(cfg.train_tasks)
    step = fns.step(spec, setup.learner)
    return learner, step, eval_fn, params0, train, sd.val, cfg, k_train, data.rating_scale


class RowsRead:
    """In-memory tasks behind the shard-set interface of :class:`~metarec.data.stream.ShardTasks`
    (``n_tasks``, ``take(rows)``) that records the rows read: meta_train reads it as it reads
    shards on disk, one meta-batch (this process's rows of it) at a time."""

    def __init__(self, tasks):
        self.tasks, self.rows = tasks, []

    @property
    def n_tasks(self) -> int:
        return self.tasks.num_tasks

    def take(self, rows):
        self.rows.extend(int(r) for r in rows)
        return index_tasks(self.tasks, np.asarray(rows))


class Stopped(Exception):
    """Raised by ``train_meta(..., stop_after_steps=n)`` before meta-step ``n + 1``."""


def _stopping(step: Callable, n: int) -> Callable:
    count = [0]

    def wrapped(*args):
        if count[0] >= n:
            raise Stopped(f"stopped before meta-step {n + 1} as asked (--stop_after_steps={n})")
        count[0] += 1
        return step(*args)

    return wrapped
