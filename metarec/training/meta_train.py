"""Meta-training with early stopping on validation users, on the one resumable trainer.

:func:`meta_train` runs a jitted meta-step (:func:`metarec.meta.step.make_meta_step`) over
meta-batches of training tasks, scores the validation users after every epoch (adapt on their
support sets, predict their query sets) and keeps the best meta-parameters by validation MAE (or
MAE minus a weight times nDCG@k, ``cfg.early_stop_ndcg_weight``).
:func:`predict_tasks` and :func:`score` are the evaluation used for validation and for the test
scenarios alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from metarec import metrics as mmetrics
from metarec.data.encode import new_item_mask
from metarec.data.stream import ShardTasks
from metarec.data.tasks import Task, check_finite_tasks, index_tasks, map_blocks, pad_tasks
from metarec.meta import tables as mtables
from metarec.meta.learners import MetaSGDParams, scale_inner_rates
from metarec.meta.step import make_meta_step, shard_tasks
from metarec.training import distributed, trainer
from metarec.training.checkpoint import Checkpointer, epoch_order, tree_digest
from metarec.training.runlog import MetricsWriter, Progress


@dataclasses.dataclass
class TrainResult:
    """What :func:`meta_train` returns: the best meta-parameters by the stopping criterion
    (validation MAE, or MAE - ``early_stop_ndcg_weight`` x nDCG@k), their validation MAE and how
    they were found. ``seconds`` is the total training time (summed over resumed pieces);
    ``steps`` the number of meta-steps taken; ``resumed_from`` the checkpoint step training
    continued from (None: fresh); ``params_sha256`` a digest of ``params``
    (:func:`metarec.training.checkpoint.tree_digest`)."""

    params: Any
    history: list[dict]
    best_epoch: int
    best_val_mae: float
    seconds: float
    steps: int = 0
    resumed_from: int | None = None
    params_sha256: str = ""


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW on the meta-parameters (gradient clipping happens inside the meta step)."""
    return optax.adamw(cfg.meta_lr, weight_decay=cfg.weight_decay)


def make_step(learner, cfg, *, tables=(), mesh=None, log_fn: Callable | None = None) -> Callable:
    """The meta-step of a training config: :func:`~metarec.meta.step.make_meta_step` with
    :func:`make_optimizer`, ``cfg.clip_norm`` and ``cfg.chunk_size`` (0 = none) on ``mesh``.

    With ``cfg.sparse_tables`` (default False) the model's lookup ``tables`` (its registry entry's
    ``lookup_tables(spec, cfg)``) are row-gathered per task instead of differentiated densely:
    the same parameters up to float summation order, and a step whose cost no longer grows with
    the catalogue. Only tables larger than the rows a task reads (``1 + S + Q``, known at the first
    call) are gathered. A learner whose inner loop adapts a table cannot use it: its step falls
    back to the dense one (one ``log_fn`` line). No ``tables`` with ``cfg.sparse_tables`` is one
    ``ValueError`` naming ``--config.sparse_tables``.
    """
    kw = dict(
        clip_norm=cfg.get("clip_norm", 0) or None,
        chunk_size=cfg.get("chunk_size", 0) or None,
        mesh=mesh,
    )
    dense = make_meta_step(learner, make_optimizer(cfg), **kw)
    if not cfg.get("sparse_tables", False):
        return dense
    if not tables:
        raise ValueError(
            f"--config.sparse_tables=True needs a model that declares lookup tables (model "
            f"{cfg.get('model', '?')!r} declares none); allowed: a model with "
            "ModelEntry.lookup_tables (melu), or --config.sparse_tables=False"
        )
    chosen: dict[tuple, Callable] = {}

    def choose(args) -> Callable:
        rows = jax.eval_shape(lambda t: mtables.row_indices(t, tables), args[2])
        big = tuple(t for t, r in zip(tables, rows) if t.vocab > r.shape[1])
        if not big:
            return dense
        sparse = make_meta_step(learner, make_optimizer(cfg), sparse_tables=big, **kw)
        try:
            jax.eval_shape(sparse, *args)  # traces the refusals of metarec.meta.tables
        except mtables.TablesRefused as e:
            if log_fn:
                log_fn(f"  {learner.name}: --config.sparse_tables: dense tables instead ({e})")
            return dense
        return sparse

    def step(meta_params, opt_state, tasks, task_weights, key=None):
        args = (meta_params, opt_state, tasks, task_weights, key)
        sig = tuple(jnp.shape(a) for a in jax.tree_util.tree_leaves(tasks))
        if sig not in chosen:
            chosen[sig] = choose(args)
        return chosen[sig](*args)

    return step


def predict_tasks(
    eval_fn, meta_params, tasks: Task, chunk: int, new_params=None
) -> dict[str, np.ndarray]:
    """Run a jitted eval function over ``tasks`` in fixed-size padded chunks (one compilation);
    with ``new_params`` (:func:`new_item_params`) the query examples of new items use those."""
    if new_params is not None:
        out, new = (predict_tasks(eval_fn, p, tasks, chunk) for p in (meta_params, new_params))
        return out | {"pred": _with_new_items(out["pred"], new["pred"], tasks)}
    n = tasks.num_tasks
    padded, _ = pad_tasks(tasks, chunk)
    outs = []
    for start in range(0, padded.num_tasks, chunk):
        batch = jax.tree_util.tree_map(lambda a, s=start: jnp.asarray(a[s : s + chunk]), padded)
        outs.append(jax.device_get(eval_fn(meta_params, batch)))
    return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def _with_new_items(pred: np.ndarray, new_pred: np.ndarray | None, tasks: Task) -> np.ndarray:
    """``pred`` with its new items' query examples taken from ``new_pred`` (if given)."""
    return pred if new_pred is None else np.where(new_item_mask(tasks.query.x), new_pred, pred)


def new_item_params(meta_params, new_scale: float | None):
    """Meta-SGD's meta-parameters with the learned inner rates times ``new_scale``, to predict new
    items; None (new items as known ones) for no or a negative scale, or no learned rates."""
    if new_scale is None or new_scale < 0 or not isinstance(meta_params, MetaSGDParams):
        return None
    return scale_inner_rates(meta_params, float(new_scale))


def _stopping_criterion(val_scores: dict, cfg) -> tuple[float, float, dict]:
    """``(validation MAE, what early stopping minimises, extra history fields)``: the MAE, or with
    ``cfg.early_stop_ndcg_weight`` = w > 0, ``MAE - w x nDCG@k`` (the tune stage's objective on
    these users), recorded in the history with the nDCG."""
    mae, w = val_scores["mae"], float(cfg.get("early_stop_ndcg_weight", 0.0))
    if not w:
        return mae, mae, {}
    ndcg = val_scores[f"ndcg@{cfg.k}"]
    crit = mae - w * ndcg
    return mae, crit, {f"val_ndcg@{cfg.k}": ndcg, "val_criterion": crit}


def check_step_scales(scales) -> None:
    """Raise ``ValueError`` naming ``--config.step_scales`` unless every scale is a number >= 0."""
    try:
        bad = [s for s in scales if not float(s) >= 0.0]
    except (TypeError, ValueError):
        bad = [scales]
    if bad:
        raise ValueError(
            f"--config.step_scales={scales!r}; allowed: numbers >= 0 (multipliers of the "
            "learned inner rates; empty: no calibration)"
        )


def calibrate_inner_rates(
    eval_fn, meta_params, tasks: Task, scales, rating_scale, k: int, chunk: int,
    ndcg_weight: float = 1.0, new_scale: float | None = None,
) -> tuple[Any, float | None, dict]:  # fmt: skip
    """Choose a multiplier of Meta-SGD's learned inner rates on ``tasks`` (validation users, after
    early stopping): the scale in ``scales`` with the lowest ``MAE - ndcg_weight x nDCG@k`` (ties:
    the scale nearest 1). Early stopping picks the epoch by the rates as learned; this picks how
    far those rates step, on the same users (scale 0 is the initialisation, not adapted). With
    ``new_scale`` >= 0 the scale is the known items' only: query examples of new items are
    predicted at ``new_scale`` for every candidate (:func:`new_item_params`).

    Returns ``(scaled meta-parameters, scale, {scale: {"mae", "ndcg@k", "objective"}})``;
    meta-parameters without learned rates, or no ``scales``, come back unchanged with scale None.
    """
    check_step_scales(scales)
    if not scales or not isinstance(meta_params, MetaSGDParams):
        return meta_params, None, {}
    table = {}
    new = new_item_params(meta_params, new_scale)  # new items: one prediction for every scale
    new = None if new is None else predict_tasks(eval_fn, new, tasks, chunk)["pred"]
    for s in dict.fromkeys(float(x) for x in scales):
        pred = predict_tasks(eval_fn, scale_inner_rates(meta_params, s), tasks, chunk)["pred"]
        m = score(_with_new_items(pred, new, tasks), tasks, rating_scale, k)
        table[s] = {
            "mae": m["mae"],
            f"ndcg@{k}": m[f"ndcg@{k}"],
            "objective": m["mae"] - ndcg_weight * m[f"ndcg@{k}"],
        }

    def rank(s):  # an undefined objective (no scorable user) never wins
        return (np.nan_to_num(table[s]["objective"], nan=np.inf), abs(s - 1.0))

    best = min(table, key=rank)
    return scale_inner_rates(meta_params, best), best, table


METRIC_CHUNK = 64  # tasks per per_task_metrics call


def _metrics(pred, tasks: Task, scale, k: int):
    # blocks of METRIC_CHUNK tasks: one compiled program for every scenario, seed and subset
    arrays = [
        np.asarray(a, np.float32)
        for a in (np.clip(pred, *scale), tasks.query.y, tasks.query.mask, pred)
    ]
    return map_blocks(
        lambda c, y, m, r: mmetrics.per_task_metrics(c, y, m, k=k, rank_scores=r),
        arrays,
        METRIC_CHUNK,
    )


def _summary(values, valid) -> dict[str, float]:
    return {m: float(mmetrics.summarize(values[m], valid[m])) for m in values}


def _per_user(values, valid, tasks: Task, k: int) -> dict[str, list]:
    out: dict[str, list] = {"user": np.asarray(tasks.user).astype(int).tolist()}
    for m in ("mae", f"ndcg@{k}"):
        v, ok = np.asarray(values[m], np.float64), np.asarray(valid[m]) > 0
        out[m] = [float(a) if o else None for a, o in zip(v, ok)]
    return out


def score(pred: np.ndarray, tasks: Task, scale: tuple[float, float], k: int) -> dict[str, float]:
    """Per-user query metrics averaged over users: MAE and RMSE of the predictions clipped to the
    rating scale, ranking metrics by the raw predictions (PROTOCOL.md: clipping creates ties)."""
    return _summary(*_metrics(pred, tasks, scale, k))


def per_user_scores(
    pred: np.ndarray, tasks: Task, scale: tuple[float, float], k: int
) -> dict[str, list]:
    """The per-user values behind :func:`score`, for paired comparisons between methods:
    ``{"user": ids, "mae": [...], "ndcg@k": [...]}``, one entry per task in order; a value the
    metric leaves undefined for a user (e.g. nDCG when every query rating is 0) is ``None``."""
    return _per_user(*_metrics(pred, tasks, scale, k), tasks, k)


def evaluate(
    pred: np.ndarray, tasks: Task, scale: tuple[float, float], k: int
) -> tuple[dict[str, float], dict[str, list]]:
    """``(score(...), per_user_scores(...))`` from one pass over the metrics."""
    values, valid = _metrics(pred, tasks, scale, k)
    return _summary(values, valid), _per_user(values, valid, tasks, k)


def _epoch_tasks(train, name: str) -> Callable[[int], Task]:
    """``epoch -> Task`` for fixed tasks or a per-epoch sampler; the last draw is memoised (a
    checkpointed epoch runs in several pieces) and every draw is checked for non-finite values
    (tasks on disk, :class:`~metarec.data.stream.ShardTasks`: every meta-batch as it is read)."""
    if isinstance(train, ShardTasks):
        return lambda epoch: train
    if not callable(train):
        check_finite_tasks(train, f"{name}: training tasks")
        return lambda epoch: train
    memo: dict[int, Task] = {}

    def get(epoch: int) -> Task:
        if epoch not in memo:
            tasks = train(epoch)
            check_finite_tasks(tasks, f"{name}: training tasks of epoch {epoch}")
            memo.clear()
            memo[epoch] = tasks
        return memo[epoch]

    return get


def meta_train(
    learner,
    step,
    eval_fn,
    init_params,
    train: Task,
    val: Task,
    cfg,
    key,
    scale,
    *,
    log_fn: Callable | None = None,
    mesh=None,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    metrics: MetricsWriter | None = None,
    unit: str = "",
    progress: bool = False,
    epoch_params: Callable | None = None,
) -> TrainResult:
    """Meta-train with ``step`` (from ``make_meta_step`` with :func:`make_optimizer`) and early
    stopping on validation MAE, or with ``cfg.early_stop_ndcg_weight`` = w > 0 on validation MAE -
    w x nDCG@``cfg.k`` (``eval_fn`` from ``make_eval_fn``); returns the best meta-parameters.

    ``train`` is a fixed :class:`Task` batch, a function ``epoch -> Task`` (a fresh draw per
    epoch, e.g. from :func:`metarec.data.sample_user_sets`; it must be deterministic in ``epoch``
    and give the same number of tasks every epoch, so a resumed run draws the same tasks), or
    fixed tasks on disk (:class:`~metarec.data.stream.ShardTasks`, read one meta-batch at a time:
    the same batches, and parameters, as the same tasks in memory).

    Sampling: epoch ``e`` visits the training tasks in the order
    :func:`~metarec.training.checkpoint.epoch_order` ``(sampler_seed, e)`` in meta-batches of
    ``min(cfg.meta_batch, n_tasks)`` (the incomplete last batch is dropped), where ``sampler_seed``
    is drawn from ``key``. One PRNG sub-key per meta-step is split off ``key`` (feature dropout).
    ``epoch_params(epoch, meta_params) -> meta_params`` (optional) is applied before an epoch's
    first step, e.g. to swap in frozen tables fitted without that epoch's query sets; what it
    sets must be leaves the meta-gradient does not reach.

    The loop runs on :mod:`metarec.training.trainer`: a piece ends every ``cfg.ckpt_every`` steps
    inside an epoch and at every epoch end (with the stopping criterion as the checkpoint metric, so
    the best one is retained). With ``resume`` it continues from the newest checkpoint and, on a
    deterministic backend, ends with bit-identical parameters and history (timings aside).

    A non-finite loss or gradient stops training with
    :class:`~metarec.training.trainer.NonFiniteLossError` naming the step; the step function already
    refused the update and nothing is saved after it. ``metrics`` gets a record every
    ``cfg.log_every`` steps and one per epoch (tagged ``unit``); ``progress`` draws a progress line
    on stderr with rate and ETA.

    Several processes (``mesh`` spanning processes, after
    :func:`metarec.training.distributed.initialize`; every process calls this with the same
    arguments): each process reads only its rows of every meta-batch
    (:func:`~metarec.training.distributed.process_rows`; from disk too) and the step all-reduces
    the gradients; params, optimizer state and key are replicated, and between pieces they are
    held as host copies, which are what is validated (on this process's default device, so every
    process computes the same validation MAE, checked) and checkpointed (every process calls the
    checkpointer: orbax writes them from process 0 only; every process reads on resume).
    ``metrics`` and ``progress`` are used on process 0 only.
    """
    name = unit or learner.name
    epoch_tasks = _epoch_tasks(train, name)
    check_finite_tasks(val, f"{name}: validation tasks")
    ckpt_every = int(cfg.get("ckpt_every", 0) or 0)
    log_every = int(cfg.get("log_every", 0) or 0)
    sampler_seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    n_tasks = epoch_tasks(1).num_tasks
    meta_batch = min(cfg.meta_batch, n_tasks)
    n_batches = n_tasks // meta_batch
    multi = distributed.spans_processes(mesh)
    # this process's rows of every meta-batch (all of them with one process)
    mine = distributed.process_rows(meta_batch, mesh) if multi else slice(0, meta_batch)
    if multi and jax.process_index() != 0:
        metrics, progress = None, False
    hold = distributed.to_host if multi else (lambda tree: tree)  # the arrays between pieces
    ident = {"sampler_seed": sampler_seed, "n_tasks": n_tasks, "meta_batch": meta_batch}

    def init() -> trainer.LoopState:
        meta_params = learner.init(init_params)
        arrays = hold(
            {
                "params": meta_params,
                "opt_state": make_optimizer(cfg).init(meta_params),
                "key": key,
            }
        )
        host = {
            "epoch": 1,
            "batch": 0,
            "losses": [],
            "history": [],
            "best_val": None,
            "best_epoch": 0,
            "best_step": None,
            "unit": name,
        }
        return trainer.LoopState(arrays, host)

    state, resumed_from = trainer.restore_or_init(
        init, checkpointer=checkpointer, resume=resume, ident=ident, what="data split or seed"
    )
    h = state.host
    best_params = state.arrays["params"]
    if resumed_from is not None:
        if h["best_step"] is not None and h["best_step"] != resumed_from:
            best = checkpointer.restore(h["best_step"], hold(state.arrays))[0]
            best_params = best["params"]
        if metrics is not None:
            metrics.truncate(name, state.step)
        if log_fn:
            log_fn(
                f"  {name}: resumed from checkpoint step {state.step} (epoch {h['epoch']}, batch "
                f"{h['batch']}/{n_batches})"
            )
    bar = None
    if progress and not state.done:
        done_steps = (h["epoch"] - 1) * n_batches + h["batch"]
        bar = Progress(cfg.epochs * n_batches, desc=name, done=done_steps)

    def piece(state: trainer.LoopState) -> tuple[trainer.LoopState, float | None]:
        nonlocal best_params
        h = state.host
        params, opt_state, k = (state.arrays[n] for n in ("params", "opt_state", "key"))
        n_step, epoch = state.step, h["epoch"]
        if epoch_params is not None and h["batch"] == 0:  # a resumed epoch has them already
            params = epoch_params(epoch, params)
        if multi:
            params, opt_state, k = distributed.replicate((params, opt_state, k), mesh)
        order = epoch_order(sampler_seed, epoch, n_tasks)
        train_e = epoch_tasks(epoch)
        if train_e.num_tasks != n_tasks:
            raise ValueError(f"{name}: epoch {epoch} drew {train_e.num_tasks} tasks, not {n_tasks}")
        while h["batch"] < n_batches:
            b = h["batch"]
            rows = order[b * meta_batch : (b + 1) * meta_batch][mine]
            if isinstance(train_e, ShardTasks):  # read from disk now, one meta-batch at a time
                tasks = train_e.take(rows)
                check_finite_tasks(tasks, f"{name}: training tasks of epoch {epoch}")
            else:
                tasks = index_tasks(train_e, rows)
            k, sub = jax.random.split(k)
            weights = jnp.ones(meta_batch)
            if multi:  # this process's rows of global arrays split over every process's devices
                tasks, weights = distributed.global_batch((tasks, np.ones(len(rows), "f4")), mesh)
            elif mesh is not None:  # data parallel: tasks split over devices, params replicated
                tasks, weights = shard_tasks(tasks, mesh), shard_tasks(weights, mesh)
            else:
                tasks = jax.tree_util.tree_map(jnp.asarray, tasks)
            new_params, new_opt_state, m = step(params, opt_state, tasks, weights, sub)
            if multi:
                m = distributed.to_host({n: m[n] for n in ("finite", "loss", "grad_norm")})
            if not bool(m["finite"]):
                if bar is not None:
                    bar.close()
                raise trainer.non_finite_error(
                    f"{name}: non-finite meta-loss or gradient at step {n_step + 1} "
                    f"(epoch {epoch}, batch {b + 1}/{n_batches}, loss {float(m['loss'])}); "
                    f"training stopped and nothing after step {n_step} was saved",
                    n_step + 1,
                    checkpointer,
                    hint="lower --config.meta_lr/--config.inner_lr or set --config.clip_norm",
                )
            params, opt_state = new_params, new_opt_state
            n_step += 1
            h["batch"] = b + 1
            loss = float(m["loss"])
            h["losses"].append(loss)
            if metrics is not None and log_every and n_step % log_every == 0:
                metrics.write(
                    {
                        "unit": name,
                        "kind": "step",
                        "step": n_step,
                        "epoch": epoch,
                        "loss": loss,
                        "grad_norm": float(m["grad_norm"]),
                        "elapsed": state.seconds,
                    }
                )
            if bar is not None:
                bar.update(epoch=epoch, loss=loss)
            if ckpt_every and n_step % ckpt_every == 0 and h["batch"] < n_batches:
                state.arrays, state.step = (
                    hold({"params": params, "opt_state": opt_state, "key": k}),
                    n_step,
                )
                return state, None
        state.arrays = hold({"params": params, "opt_state": opt_state, "key": k})
        if multi:  # this process's copy, on its default device, for the local evaluation
            params = jax.tree_util.tree_map(jnp.asarray, state.arrays["params"])
        out = predict_tasks(eval_fn, params, val, cfg.eval_chunk)
        val_scores = score(out["pred"], val, scale, cfg.k)
        val_mae, criterion, extra = _stopping_criterion(val_scores, cfg)
        if multi:  # early stopping must agree, or the processes would part ways
            multihost_utils.assert_equal(criterion, f"{name}: processes differ in validation")
        train_loss = float(np.mean(h["losses"]))
        h["history"].append(
            {
                "epoch": epoch,
                "step": n_step,
                "train_loss": train_loss,
                "val_mae": val_mae,
                **extra,
                "seconds": state.seconds,
            }
        )
        if metrics is not None:
            metrics.write(
                {
                    "unit": name,
                    "kind": "epoch",
                    "step": n_step,
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_mae": val_mae,
                    "elapsed": state.seconds,
                }
            )
        if log_fn:
            log_fn(f"  {name} epoch {epoch:3d} train_loss {train_loss:.4f} val_mae {val_mae:.4f}")
        best_val = np.inf if h["best_val"] is None else h["best_val"]
        if criterion < best_val:
            h["best_val"], h["best_epoch"], h["best_step"] = criterion, epoch, n_step
            best_params = params
        state.done = epoch - h["best_epoch"] >= cfg.patience or epoch >= cfg.epochs
        h["epoch"], h["batch"], h["losses"] = epoch + 1, 0, []
        state.step = n_step
        return state, criterion

    state = trainer.run(piece, state, checkpointer=checkpointer, ident=ident)
    h = state.host
    best_val = next((r["val_mae"] for r in h["history"] if r["epoch"] == h["best_epoch"]), np.inf)
    if bar is not None:
        bar.close(best_val_mae=float(best_val))
    if multi:  # a host copy (checkpointed or resumed state): on this process's default device
        best_params = jax.tree_util.tree_map(jnp.asarray, best_params)
    return TrainResult(
        params=best_params,
        history=h["history"],
        best_epoch=h["best_epoch"],
        best_val_mae=float(best_val),
        seconds=state.seconds,
        steps=state.step,
        resumed_from=resumed_from,
        params_sha256=tree_digest(best_params),
    )


def meta_fit(
    step: Callable,
    meta_params,
    opt_state,
    tasks,
    *,
    meta_batch: int,
    epochs: int,
    seed: int,
    use_keys: bool = False,
    callback: Callable[[int, dict], None] | None = None,
):
    """Run ``epochs`` epochs of a step from :func:`~metarec.meta.step.make_meta_step` on the
    trainer, one piece per epoch, without validation or checkpoints (research-code convenience).

    Each epoch visits the (host numpy) ``tasks`` once in a seeded random order
    (``numpy.random.default_rng(seed + epoch)``), in meta-batches of ``meta_batch`` tasks (the last
    incomplete batch is padded with weight-0 tasks, so every batch has one static shape). With
    ``use_keys`` a PRNG key derived from ``seed`` and the step number is passed to every step
    (feature dropout). ``callback(step_index, metrics)`` receives host-side float metrics.

    Returns ``(meta_params, opt_state, history)``: ``history`` has one metric dict per step; a step
    whose loss or gradient was non-finite is recorded (``finite`` False) and skipped by the step
    itself (old parameters kept).
    """
    n = jax.tree_util.tree_leaves(tasks)[0].shape[0]
    if meta_batch <= 0 or epochs < 0:
        raise ValueError(f"meta_batch must be > 0 and epochs >= 0, got {meta_batch}, {epochs}")
    base_key = jax.random.key(seed)
    history: list[dict] = []

    def epoch_piece(state: trainer.LoopState) -> tuple[trainer.LoopState, None]:
        params, opt = state.arrays
        epoch = state.host["epoch"]
        order = np.random.default_rng(seed + epoch).permutation(n)
        for start in range(0, n, meta_batch):
            batch, weights = pad_tasks(
                index_tasks(tasks, order[start : start + meta_batch]), meta_batch
            )
            key = jax.random.fold_in(base_key, state.step) if use_keys else None
            params, opt, metrics = step(params, opt, batch, weights, key)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()} | {"epoch": epoch}
            history.append(m)
            if callback is not None:
                callback(state.step, m)
            state.step += 1
        state.arrays, state.host["epoch"] = (params, opt), epoch + 1
        state.done = epoch + 1 >= epochs
        return state, None

    state = trainer.LoopState((meta_params, opt_state), {"epoch": 0}, done=epochs == 0)
    params, opt = trainer.run(epoch_piece, state).arrays
    return params, opt, history
