"""The cold-start experiment as a library: meta-train on warm users, evaluate every method on every
scenario, several seeds — :func:`run` returns the ``results.json`` dict of PROTOCOL.md.

Per seed (PROTOCOL.md, "melu" or "time"):

1. :func:`metarec.data.make_split` builds the scenarios; warm_train users are split again into
   train / validation users (``val_fraction``, seeded) — validation users drive early stopping and any
   tuning; no test scenario is ever looked at before the final evaluation.
2. Each meta-learner (``algos``) meta-trains a MeLU-style model (:mod:`metarec.models.melu`) with
   ``make_meta_step`` (vmapped tasks, one jitted step); after every epoch the validation users are
   adapted and scored and the best parameters by validation MAE are kept (early stopping with
   ``patience``).
3. Baselines: global/user/item means, biased MF with fold-in, user-/item-kNN (all fitted on the
   training ratings only), ``no_adapt`` (the first meta-learner's initialisation, not adapted) and
   ``finetune`` (the same network trained conventionally on the pooled training ratings, then
   fine-tuned per user with the same inner loop; its step size chosen on validation users).
4. Every method predicts each test user's 10 query ratings from the support set only; predictions
   are clipped to the rating scale; MAE, RMSE, nDCG@3 (and more) are averaged over users.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from metarec import baselines as mbaselines
from metarec import data as mdata
from metarec import metrics as mmetrics
from metarec.training.checkpoint import Checkpointer, epoch_order, tree_digest
from metarec.data.tasks import Examples, Task, index_tasks, pad_tasks
from metarec.meta import make_learner
from metarec import pretrain
from metarec.models import melu
from metarec.models import transformer as tfm
from metarec.models.transformer import add_history
from metarec.training.runlog import MetricsWriter, Progress, read_json, run_metadata, write_json_atomic
from metarec.meta.step import make_eval_fn, make_mesh, make_meta_step, shard_tasks

log = logging.getLogger("metarec.coldstart")

META_ALGOS = ("maml", "fomaml", "reptile", "metasgd", "imaml")
BASELINES = ("global_mean", "user_mean", "item_mean", "mf", "user_knn", "item_knn", "no_adapt", "finetune")
ADAPT_CHOICES = ("decision", "all", "head", "context", "decision+context")
TF_ADAPT_CHOICES = ("head", "lora", "head+last_block", "all")
MODELS = ("melu", "transformer")
TEST_SCENARIOS = mdata.SCENARIOS
TABLE_METRICS = ("mae", "rmse", "ndcg@3")
SUPPORT_WIDTH = {"melu": 100 - 10, "time": 15}  # largest support set each protocol can produce


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the README main job (chosen on validation users; see BUILD_NOTES.md)."""
    c = ml_collections.ConfigDict()
    c.dataset = "ml-100k"
    c.data_dir = ""
    c.download = False
    c.protocol = "melu"
    c.seeds = [0, 1, 2]
    c.algos = ["maml", "fomaml", "reptile", "metasgd", "imaml"]
    c.baselines = list(BASELINES)
    # model
    c.embed_dim = 32
    c.hidden = [64, 64]
    c.residual = True
    c.use_item_id = True
    c.feature_dropout = 0.1
    c.context_dim = 0  # > 0: CAVIA-style adaptable user-context vector (adapted with --adapt=*context)
    c.offset_prior = 2.0
    c.residual_bound = 4.0  # predictions within offset ± 4 (b * tanh(f / b)); 0 = unbounded
    # meta-learning
    c.adapt = "decision"
    c.inner_steps = 5
    c.inner_lr = 0.05
    c.reptile_inner_lr = 0.05  # Reptile adapts every parameter (embeddings too): a smaller step
    c.imaml_inner_lr = 0.05  # iMAML's proximal inner solve diverged at 0.3 (loss 3e22 at step 31, seed 0)
    c.meta_lr = 3e-3
    c.weight_decay = 1e-4
    c.clip_norm = 10.0
    c.meta_batch = 32
    c.epochs = 30
    c.patience = 8
    c.val_fraction = 0.15
    c.imaml_lam = 1.0
    c.imaml_cg_steps = 5
    c.eval_chunk = 64
    c.finetune_lrs = [0.01, 0.03, 0.1]
    c.finetune_epochs = 30
    c.k = 3
    c.all_devices = False  # data-parallel meta-steps over every visible device (jax.sharding)
    # tasks vmapped at once inside a meta-step (chunks run one after another): on a CPU a small working
    # set avoids fresh page faults every step (see BUILD_NOTES, benchmark); 0 = the whole meta-batch
    c.chunk_size = 8
    # run bookkeeping (issue 7): checkpoints, metrics, adaptation curves
    c.ckpt_every = 50  # meta-steps between checkpoints inside an epoch (0: only at epoch ends)
    c.keep_checkpoints = 2  # newest checkpoints kept per (seed, algorithm), plus the best by validation MAE
    c.log_every = 10  # meta-steps between metric records (metrics.jsonl / metrics.csv / TensorBoard)
    c.adaptation_curves = True  # re-evaluate the first algorithm with curve_steps / curve_support
    c.curve_steps = [0, 1, 2, 5, 10]  # inner steps at test time for the MAE-vs-steps curve
    c.curve_support = [1, 3, 5, 10, 20]  # support-set sizes for the MAE-vs-support curve
    # large-model path (issue 5): --model=transformer rates with a (pretrained) history encoder
    c.model = "melu"
    c.init_from = ""  # pretraining checkpoint dir; "{seed}" is replaced by the seed (one per split seed)
    c.tf_width = 64
    c.tf_depth = 2
    c.tf_heads = 2
    c.lora_rank = 0
    return c


# ----------------------------------------------------------------------------------------------
# per-seed data
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SeedData:
    split: mdata.Split
    encoder: mdata.FeatureEncoder
    train_sets: mdata.UserSets
    val_sets: mdata.UserSets
    train: Task
    val: Task
    test: dict[str, Task]
    test_sets: dict[str, mdata.UserSets]
    encode: Callable[[mdata.UserSets], Task]  # UserSets -> model-ready Task (padding, history)


def prepare_seed(data: mdata.RatingsData, seed: int, cfg) -> SeedData:
    """Scenarios, vocabularies and encoded tasks for one seed; all support sets padded to one width."""
    split = mdata.make_split(data, seed, cfg.protocol)
    empty = [k for k, v in split.sets.items() if v.n_users == 0]
    if empty:
        rule = ("each user needs 13..100 ratings inside the scenario" if cfg.protocol == "melu"
                else "each user needs at least 20 ratings inside the scenario")  # fmt: skip
        raise ValueError(
            f"scenario(s) {empty} are empty after filtering for {data.name} / protocol {cfg.protocol} / seed "
            f"{seed} ({rule}; sizes: {dict((k, v.n_users) for k, v in split.sets.items())}); nothing can be "
            "trained or scored there: use a larger dataset or another --protocol"
        )
    encoder = mdata.FeatureEncoder.fit(data, split.train_ratings, offset_prior=cfg.offset_prior, stable_shapes=True)
    train_sets, val_sets = mdata.split_validation(split.sets["warm_train"], cfg.val_fraction, seed + 2)
    # one support width per protocol (not per seed), so every seed shares the compiled steps
    width = max([SUPPORT_WIDTH[cfg.protocol]] + [v.support_item.shape[1] for v in split.sets.values()])
    def enc(s: mdata.UserSets) -> Task:
        tasks = encoder.encode(s.pad_support(width))
        # the transformer rater reads the support set as the user's history
        return add_history(tasks) if cfg.model == "transformer" else tasks

    test_sets = {k: split.sets[k] for k in TEST_SCENARIOS}
    return SeedData(
        split, encoder, train_sets, val_sets, enc(train_sets), enc(val_sets),
        {k: enc(v) for k, v in test_sets.items()}, test_sets, enc,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# models and learners
# ----------------------------------------------------------------------------------------------
def build_model(spec, cfg, init_from: str = "") -> tuple[Callable, Callable]:
    """``(init_fn, apply_fn)`` of ``cfg.model``: the MeLU-style MLP, or the Transformer rater on a
    history encoder (pretrained when ``init_from`` names a checkpoint of ``experiments/pretrain.py``)."""
    if cfg.model == "transformer":
        if init_from:
            enc_cfg, _ = pretrain.load_pretrained(init_from)
        else:
            enc_cfg = tfm.EncoderConfig(
                num_items=spec.item_vocab[1], max_len=max(SUPPORT_WIDTH.values()), width=cfg.tf_width,
                depth=cfg.tf_depth, heads=cfg.tf_heads,
            )  # fmt: skip
        rc = tfm.RaterConfig(encoder=enc_cfg, n_years=spec.item_vocab[0], n_genres=spec.n_genres, lora_rank=cfg.lora_rank)
        return tfm.make_transformer_rater(rc, init_from=init_from or None)
    return melu.make_melu(
        spec, embed_dim=cfg.embed_dim, hidden=tuple(cfg.hidden), residual=cfg.residual,
        use_item_id=cfg.use_item_id, feature_dropout=cfg.feature_dropout, context_dim=cfg.context_dim,
        residual_bound=cfg.residual_bound,
    )  # fmt: skip


def adapt_filter(cfg, adapt: str):
    """The inner-loop parameter filter called ``adapt`` for ``cfg.model``."""
    if cfg.model == "transformer":
        return tfm.adapt_filter(adapt, depth=cfg.tf_depth)
    return melu.adapt_filter(adapt)


def build_learner(name: str, apply_fn: Callable, cfg, *, inner_lr=None, inner_steps=None, adapt=None):
    if name not in META_ALGOS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {list(META_ALGOS)}")
    adapt = adapt or cfg.adapt
    if name == "reptile":
        # Reptile's meta-gradient (theta - phi) is zero on leaves the inner loop does not adapt, so a
        # partial filter would leave the embeddings untrained: Reptile always adapts every parameter.
        adapt = "all"
        inner_lr = cfg.reptile_inner_lr if inner_lr is None else inner_lr
    if name == "imaml" and inner_lr is None:
        inner_lr = cfg.imaml_inner_lr
    kwargs = dict(
        inner_steps=cfg.inner_steps if inner_steps is None else inner_steps,
        inner_lr=cfg.inner_lr if inner_lr is None else inner_lr,
        adapt_mask=adapt_filter(cfg, adapt),
    )
    if name == "imaml":
        kwargs.update(lam=cfg.imaml_lam, cg_steps=cfg.imaml_cg_steps)
    return make_learner(name, apply_fn, **kwargs)


def predict_tasks(eval_fn, meta_params, tasks: Task, chunk: int) -> dict[str, np.ndarray]:
    """Run a jitted eval function over ``tasks`` in fixed-size padded chunks (one compilation)."""
    n = tasks.num_tasks
    padded, _ = pad_tasks(tasks, chunk)
    outs = []
    for start in range(0, padded.num_tasks, chunk):
        batch = jax.tree_util.tree_map(lambda a: jnp.asarray(a[start : start + chunk]), padded)
        outs.append(jax.device_get(eval_fn(meta_params, batch)))
    return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def score(pred: np.ndarray, tasks: Task, scale: tuple[float, float], k: int) -> dict[str, float]:
    """Per-user query metrics averaged over users (predictions clipped to the rating scale)."""
    pred = np.clip(pred, *scale)
    values, valid = mmetrics.per_task_metrics(pred, tasks.query.y, tasks.query.mask, k=k)
    return {m: float(mmetrics.summarize(values[m], valid[m])) for m in values}


@dataclasses.dataclass
class TrainResult:
    """What :func:`meta_train` returns: the best meta-parameters by validation MAE and how they were
    found. ``seconds`` is the total training time (summed over resumed pieces); ``steps`` the number
    of meta-steps taken; ``resumed_from`` the checkpoint step training continued from (None: fresh);
    ``params_sha256`` a digest of ``params`` (:func:`metarec.training.checkpoint.tree_digest`)."""

    params: Any
    history: list[dict]
    best_epoch: int
    best_val_mae: float
    seconds: float
    steps: int = 0
    resumed_from: int | None = None
    params_sha256: str = ""


class NonFiniteLossError(FloatingPointError):
    """Meta-training produced a non-finite loss or gradient. ``step`` is the 1-based meta-step that
    failed; ``last_good_step`` the newest checkpoint kept (None without checkpoints)."""

    def __init__(self, message: str, step: int, last_good_step: int | None, checkpoint_dir: str | None):
        super().__init__(message)
        self.step, self.last_good_step, self.checkpoint_dir = step, last_good_step, checkpoint_dir


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW on the meta-parameters (gradient clipping happens inside the meta step)."""
    return optax.adamw(cfg.meta_lr, weight_decay=cfg.weight_decay)


class Compiled:
    """Memo of models, learners and their jitted steps, keyed by everything that shapes them, so
    seeds with identical parameter shapes (see ``FeatureEncoder.fit(stable_shapes=True)``) reuse one
    compilation instead of compiling again."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.cache: dict = {}
        self.mesh = make_mesh() if cfg.all_devices else None
        self.init_from = ""

    def use_seed(self, seed: int) -> "Compiled":
        """Select the seed's pretraining checkpoint (``cfg.init_from`` with ``{seed}`` filled in)."""
        self.init_from = self.cfg.init_from.format(seed=seed) if self.cfg.init_from else ""
        return self

    def _get(self, key, make):
        key = key + (self.init_from,)
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def model(self, spec):
        return self._get(("model", spec), lambda: build_model(spec, self.cfg, self.init_from))

    def learner(self, spec, name, **kw):
        key = ("learner", spec, name, tuple(sorted(kw.items())))
        return self._get(key, lambda: build_learner(name, self.model(spec)[1], self.cfg, **kw))

    def step(self, spec, name, **kw):
        key = ("step", spec, name, tuple(sorted(kw.items())))
        clip = self.cfg.clip_norm or None
        return self._get(key, lambda: make_meta_step(
            self.learner(spec, name, **kw), make_optimizer(self.cfg), clip_norm=clip, mesh=self.mesh,
            chunk_size=self.cfg.chunk_size or None))

    def eval(self, spec, name, **kw):
        key = ("eval", spec, name, tuple(sorted(kw.items())))
        return self._get(key, lambda: make_eval_fn(self.learner(spec, name, **kw), self.model(spec)[1]))


def check_pretrained_vocab(path: str, encoder, seed: int) -> None:
    """A pretraining checkpoint indexes items by its split's vocabulary: refuse another seed's."""
    _, _, info = pretrain.load_pretrained(path, with_metadata=True)
    ids = info.get("item_ids")
    if ids is not None and not np.array_equal(np.asarray(ids), pretrain.item_ids_of_vocab(encoder)):
        raise ValueError(
            f"--init_from={path}: the checkpoint's item vocabulary is not this split's (seed {seed}); pretrain "
            f"per seed with `python -m experiments.pretrain --seed={seed} --workdir=...` and pass "
            "--init_from=<dir>/seed{seed}"
        )


def check_finite_tasks(tasks: Task, name: str) -> None:
    """Raise ``ValueError`` if a floating-point input, target or mask of ``tasks`` is NaN or inf,
    naming the set (``name``), the field, the task index, the user id and how many values are bad.
    A host-side check (numpy), run once before training: a NaN feature would otherwise surface much
    later as a non-finite loss."""
    leaves = jax.tree_util.tree_flatten_with_path(tasks)[0]
    for path, leaf in leaves:
        a = np.asarray(leaf)
        if not np.issubdtype(a.dtype, np.floating):
            continue
        bad = ~np.isfinite(a)
        if bad.any():
            first = np.argwhere(bad)[0]
            user = int(np.asarray(tasks.user)[first[0]]) if a.ndim and a.shape[0] == tasks.user.shape[0] else None
            raise ValueError(
                f"{name}: {int(bad.sum())} non-finite value(s) (NaN/inf) in {jax.tree_util.keystr(path).lstrip('.')} "
                f"(first at index {tuple(int(i) for i in first)}, user {user}, value {a[tuple(first)]}); "
                "inputs, targets and masks must be finite numbers"
            )


def _tree_like(meta_params, opt_state, key) -> dict:
    return {"params": meta_params, "opt_state": opt_state, "key": key}


def meta_train(
    learner, step, eval_fn, init_params, train: Task, val: Task, cfg, key, scale, *,
    log_fn: Callable | None = None, mesh=None, checkpointer: Checkpointer | None = None, resume: bool = False,
    metrics: MetricsWriter | None = None, unit: str = "", progress: bool = False,
) -> TrainResult:  # fmt: skip
    """Meta-train with ``step`` (from ``make_meta_step`` with :func:`make_optimizer`) and early
    stopping on validation MAE (``eval_fn`` from ``make_eval_fn``); returns the best meta-parameters.

    Sampling: epoch ``e`` visits the training tasks in the order :func:`metarec.training.checkpoint.epoch_order`
    ``(sampler_seed, e)`` in meta-batches of ``min(cfg.meta_batch, n_tasks)`` (the incomplete last
    batch is dropped), where ``sampler_seed`` is drawn from ``key``. One PRNG sub-key per meta-step is
    split off ``key`` (feature dropout). The whole loop state is therefore (params, optimizer state,
    key, step, epoch, batch index, this epoch's losses, history, early-stopping state).

    Checkpoints (``checkpointer``): every ``cfg.ckpt_every`` steps inside an epoch and at every epoch
    end (with the validation MAE as the metric, so the best one is retained). With ``resume`` the loop
    continues from the newest checkpoint and, on a deterministic backend, ends with bit-identical
    parameters and history (timings aside) to an uninterrupted run.

    A non-finite loss or gradient stops training with :class:`NonFiniteLossError` naming the step;
    the step function already refused the update, nothing is saved after it, so the newest checkpoint
    is the last good state and ``--resume`` continues from it.

    ``metrics`` gets a record every ``cfg.log_every`` steps and one per epoch (tagged ``unit``);
    ``progress`` draws a progress line on stderr with rate and ETA.
    """
    check_finite_tasks(train, f"{unit or learner.name}: training tasks")
    check_finite_tasks(val, f"{unit or learner.name}: validation tasks")
    ckpt_every = int(cfg.get("ckpt_every", 0) or 0)
    log_every = int(cfg.get("log_every", 0) or 0)
    meta_params = learner.init(init_params)
    opt_state = make_optimizer(cfg).init(meta_params)
    sampler_seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    n_tasks = train.num_tasks
    meta_batch = min(cfg.meta_batch, n_tasks)
    n_batches = n_tasks // meta_batch
    name = unit or learner.name

    n_step, epoch, batch, losses, history = 0, 1, 0, [], []
    best_val, best_epoch, best_step, best_params = np.inf, 0, None, meta_params
    elapsed, done, resumed_from = 0.0, False, None
    if checkpointer is not None and resume and checkpointer.latest_step() is not None:
        resumed_from = checkpointer.latest_step()
        st, meta = checkpointer.restore(resumed_from, _tree_like(meta_params, opt_state, key))
        if (meta["sampler_seed"], meta["n_tasks"], meta["meta_batch"]) != (sampler_seed, n_tasks, meta_batch):
            raise ValueError(
                f"{checkpointer.directory}: checkpoint was written for another data split or seed "
                f"(sampler seed / training tasks / meta-batch {meta['sampler_seed']}/{meta['n_tasks']}/"
                f"{meta['meta_batch']}, now {sampler_seed}/{n_tasks}/{meta_batch}); use a fresh --workdir"
            )
        meta_params, opt_state, key = st["params"], st["opt_state"], st["key"]
        n_step, epoch, batch = meta["step"], meta["epoch"], meta["batch"]
        losses, history, elapsed, done = list(meta["losses"]), list(meta["history"]), meta["elapsed"], meta["done"]
        best_val, best_epoch, best_step = meta["best_val"], meta["best_epoch"], meta["best_step"]
        best_val = np.inf if best_val is None else best_val
        if best_step is not None:
            if best_step == resumed_from:
                best_params = meta_params
            else:
                best_params = checkpointer.restore(best_step, _tree_like(meta_params, opt_state, key))[0]["params"]
        if metrics is not None:
            metrics.truncate(name, n_step)
        if log_fn:
            log_fn(f"  {name}: resumed from checkpoint step {n_step} (epoch {epoch}, batch {batch}/{n_batches})")

    def save(metric=None):
        if checkpointer is None:
            return
        meta = {
            "epoch": epoch, "batch": batch, "losses": losses, "history": history, "elapsed": elapsed + time.time() - t0,
            "done": done, "best_val": None if not np.isfinite(best_val) else best_val, "best_epoch": best_epoch,
            "best_step": best_step, "sampler_seed": sampler_seed, "n_tasks": n_tasks, "meta_batch": meta_batch,
            "unit": name,
        }  # fmt: skip
        checkpointer.save(n_step, _tree_like(meta_params, opt_state, key), meta, metric=metric)

    bar = None
    if progress and not done:
        bar = Progress(cfg.epochs * n_batches, desc=name, done=(epoch - 1) * n_batches + batch)
    t0 = time.time()
    while not done and epoch <= cfg.epochs:
        order = epoch_order(sampler_seed, epoch, n_tasks)
        while batch < n_batches:
            tasks = index_tasks(train, order[batch * meta_batch : (batch + 1) * meta_batch])
            key, sub = jax.random.split(key)
            weights = jnp.ones(meta_batch)
            if mesh is not None:  # data parallel: tasks split over devices, params replicated
                tasks, weights = shard_tasks(tasks, mesh), shard_tasks(weights, mesh)
            else:
                tasks = jax.tree_util.tree_map(jnp.asarray, tasks)
            new_params, new_state, m = step(meta_params, opt_state, tasks, weights, sub)
            if not bool(m["finite"]):
                last = None if checkpointer is None else checkpointer.latest_step()
                if checkpointer is None:
                    how = "no checkpoints were written (pass a --workdir); lower --meta_lr/--inner_lr or set --clip_norm"
                elif last is None:
                    how = (f"no checkpoint was saved yet in {checkpointer.directory}; lower --meta_lr/--inner_lr "
                           "or set --clip_norm and start again")  # fmt: skip
                else:
                    how = (f"the last good checkpoint (step {last}) is kept in {checkpointer.directory}; lower "
                           "--meta_lr/--inner_lr or set --clip_norm and rerun the same command with --resume "
                           "to continue from it")  # fmt: skip
                if bar is not None:
                    bar.close()
                raise NonFiniteLossError(
                    f"{name}: non-finite meta-loss or gradient at step {n_step + 1} (epoch {epoch}, batch "
                    f"{batch + 1}/{n_batches}, loss {float(m['loss'])}); training stopped and nothing after "
                    f"step {n_step} was saved: {how}.",
                    n_step + 1, last, None if checkpointer is None else checkpointer.directory,
                )  # fmt: skip
            meta_params, opt_state = new_params, new_state
            n_step += 1
            batch += 1
            loss = float(m["loss"])
            losses.append(loss)
            if metrics is not None and log_every and n_step % log_every == 0:
                metrics.write({"unit": name, "kind": "step", "step": n_step, "epoch": epoch, "loss": loss,
                               "grad_norm": float(m["grad_norm"]), "elapsed": elapsed + time.time() - t0})  # fmt: skip
            if bar is not None:
                bar.update(epoch=epoch, loss=loss)
            if ckpt_every and n_step % ckpt_every == 0 and batch < n_batches:
                save()
        out = predict_tasks(eval_fn, meta_params, val, cfg.eval_chunk)
        val_mae = score(out["pred"], val, scale, cfg.k)["mae"]
        train_loss = float(np.mean(losses))
        history.append({"epoch": epoch, "step": n_step, "train_loss": train_loss, "val_mae": val_mae,
                        "seconds": elapsed + time.time() - t0})  # fmt: skip
        if metrics is not None:
            metrics.write({"unit": name, "kind": "epoch", "step": n_step, "epoch": epoch, "train_loss": train_loss,
                           "val_mae": val_mae, "elapsed": elapsed + time.time() - t0})  # fmt: skip
        if log_fn:
            log_fn(f"  {name} epoch {epoch:3d} train_loss {train_loss:.4f} val_mae {val_mae:.4f}")
        if val_mae < best_val:
            best_val, best_epoch, best_step, best_params = val_mae, epoch, n_step, meta_params
        done = epoch - best_epoch >= cfg.patience or epoch >= cfg.epochs
        epoch, batch, losses = epoch + 1, 0, []
        save(metric=val_mae)
    if bar is not None:
        bar.close(best_val_mae=float(best_val))
    return TrainResult(
        best_params, history, best_epoch, float(best_val), elapsed + time.time() - t0, n_step, resumed_from,
        tree_digest(best_params),
    )  # fmt: skip


def pooled(tasks: Task) -> Task:
    """Support and query of every training task concatenated into the query set (empty support):
    conventional (non-meta) training on the same ratings."""
    cat = lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)], axis=1)  # noqa: E731
    q = jax.tree_util.tree_map(cat, tasks.support, tasks.query)
    empty = jax.tree_util.tree_map(lambda a: np.asarray(a)[:, :1], tasks.support)
    empty = empty.replace(mask=np.zeros_like(empty.mask))
    return Task(support=empty, query=q, user=tasks.user)


# ----------------------------------------------------------------------------------------------
# adaptation curves
# ----------------------------------------------------------------------------------------------
def subsample_support(sets: mdata.UserSets, size: int, *, strict: bool = True, scenario: str = "") -> mdata.UserSets:
    """Keep the first ``size`` support ratings of every user (the protocol's support order is already a
    seeded random permutation, so these are a random subset; for the time protocol the earliest).

    ``strict``: a user with fewer than ``size`` support ratings raises ``ValueError`` naming the user,
    the scenario and what is available; otherwise such users are left out. The support width is kept.
    """
    if size < 0:
        raise ValueError(f"support size must be >= 0, got {size}")
    have = sets.support_mask.sum(1).astype(int)
    short = have < size
    if strict and short.any():
        i = int(np.flatnonzero(short)[0])
        where = f"scenario {scenario}: " if scenario else ""
        raise ValueError(
            f"{where}user {int(sets.user_id[i])} has {have[i]} support ratings, fewer than the requested "
            f"{size} ({int(short.sum())} of {sets.n_users} users are short; smallest support set {int(have.min())})"
        )
    out = sets.select(~short)
    keep = (np.arange(out.support_mask.shape[1])[None, :] < size).astype(out.support_mask.dtype)
    return dataclasses.replace(
        out, support_item=out.support_item * keep.astype(out.support_item.dtype),
        support_rating=out.support_rating * keep.astype(out.support_rating.dtype),
        support_mask=out.support_mask * keep, support_time=out.support_time * keep.astype(out.support_time.dtype),
    )  # fmt: skip


def adaptation_curves(fns: Compiled, spec, name: str, params, sd: SeedData, cfg, scale) -> dict:
    """Test MAE of the trained meta-parameters ``params`` of learner ``name`` per scenario
    (a) versus the number of inner steps (``cfg.curve_steps``; 0 = the initialisation, not adapted) and
    (b) versus the support-set size (``cfg.curve_support``; each user's first ``n`` support ratings,
    users with fewer left out and counted; the offset feature is recomputed from the subset).
    Returns ``{"steps": {scenario: {k: mae}}, "support": {scenario: {n: {"mae", "n_users"}}}}``."""
    out: dict = {"steps": {s: {} for s in sd.test}, "support": {s: {} for s in sd.test}}
    for k in cfg.curve_steps:
        kw = {} if int(k) == cfg.inner_steps else {"inner_steps": int(k)}
        ev = fns.eval(spec, name, **kw)
        for s, t in sd.test.items():
            out["steps"][s][str(int(k))] = score(predict_tasks(ev, params, t, cfg.eval_chunk)["pred"], t, scale, cfg.k)["mae"]
    ev = fns.eval(spec, name)
    for n in cfg.curve_support:
        for s, sets in sd.test_sets.items():
            sub = subsample_support(sets, int(n), strict=False)
            if sub.n_users == 0:
                continue
            t = sd.encode(sub)
            mae = score(predict_tasks(ev, params, t, cfg.eval_chunk)["pred"], t, scale, cfg.k)["mae"]
            out["support"][s][str(int(n))] = {"mae": mae, "n_users": sub.n_users}
    return out


# ----------------------------------------------------------------------------------------------
# one seed
# ----------------------------------------------------------------------------------------------
def unit_paths(workdir: str, seed: int, unit: str) -> tuple[str, str]:
    """``(checkpoint directory, result file)`` of one (seed, algorithm) unit inside ``workdir``."""
    return (os.path.join(workdir, "checkpoints", f"seed{seed}", unit),
            os.path.join(workdir, "units", f"seed{seed}", f"{unit}.json"))  # fmt: skip


@dataclasses.dataclass
class RunContext:
    """Where and how :func:`run_seed` keeps its state: ``workdir`` (None: nothing written), ``resume``
    (skip finished units, continue unfinished ones from their newest checkpoint), a metrics writer,
    whether to draw progress lines, and provenance copied into every unit file."""

    workdir: str | None = None
    resume: bool = False
    metrics: MetricsWriter | None = None
    progress: bool = False
    provenance: dict = dataclasses.field(default_factory=dict)


def _train_unit(ctx: RunContext, seed: int, unit: str, log_fn, cfg, train_fn: Callable[..., TrainResult]):
    """Run ``train_fn(checkpointer=..., resume=..., metrics=..., unit=..., progress=...)`` with this
    unit's checkpoint directory (or none without a workdir)."""
    if ctx.workdir is None:
        return train_fn(checkpointer=None, resume=False, metrics=None, unit=f"seed{seed}/{unit}", progress=ctx.progress)
    ckpt_dir, _ = unit_paths(ctx.workdir, seed, unit)
    with Checkpointer(ckpt_dir, keep_last=cfg.get("keep_checkpoints", 2), keep_best=1) as ck:
        if ck.latest_step() is not None and not ctx.resume:
            raise ValueError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue or use a fresh --workdir")
        return train_fn(checkpointer=ck, resume=ctx.resume, metrics=ctx.metrics, unit=f"seed{seed}/{unit}",
                        progress=ctx.progress)  # fmt: skip


def _load_unit(ctx: RunContext, seed: int, unit: str) -> dict | None:
    if ctx.workdir is None or not ctx.resume:
        return None
    path = unit_paths(ctx.workdir, seed, unit)[1]
    return read_json(path) if os.path.exists(path) else None


def _save_unit(ctx: RunContext, seed: int, unit: str, rec: dict) -> None:
    if ctx.workdir is not None:
        write_json_atomic(unit_paths(ctx.workdir, seed, unit)[1], {"seed": seed, "unit": unit} | ctx.provenance | rec)


def run_seed(
    data: mdata.RatingsData, seed: int, cfg, log_fn: Callable = print, compiled: Compiled | None = None,
    ctx: RunContext | None = None,
) -> dict:  # fmt: skip
    """All methods on all scenarios for one seed: ``{scenario: {method: {metric: value}}}`` plus
    ``_info`` (scenario sizes, training histories, timings, parameter digests, adaptation curves).

    Each meta-learner and ``finetune`` is a unit: with ``ctx.workdir`` it is checkpointed under
    ``checkpoints/seed<seed>/<unit>`` and its scores saved to ``units/seed<seed>/<unit>.json`` when
    done; with ``ctx.resume`` finished units are read back instead of trained, and an unfinished one
    continues from its newest checkpoint. Baselines are cheap and deterministic: always recomputed.
    """
    ctx = ctx or RunContext()
    sd = prepare_seed(data, seed, cfg)
    scale = data.rating_scale
    spec = sd.encoder.spec
    fns = (compiled or Compiled(cfg)).use_seed(seed)
    if fns.init_from:
        check_pretrained_vocab(fns.init_from, sd.encoder, seed)
    init_fn, _ = fns.model(spec)
    key = jax.random.PRNGKey(seed)
    results = {s: {} for s in TEST_SCENARIOS}
    info = {"n_users": {s: int(t.num_tasks) for s, t in sd.test.items()},
            "n_train_users": int(sd.train.num_tasks), "n_val_users": int(sd.val.num_tasks),
            "histories": {}, "seconds": {}, "params_sha256": {}, "best_epoch": {}, "resumed": []}  # fmt: skip
    for s, t in sd.test.items():
        r = score(np.zeros_like(t.query.y), t, scale, cfg.k)
        results[s]["random"] = {f"ndcg@{cfg.k}": r[f"random_ndcg@{cfg.k}"]}

    def record(unit, rec):
        for s in TEST_SCENARIOS:
            results[s].update(rec["scores"][s])
        info["histories"][unit] = rec["history"]
        info["seconds"][unit] = rec["seconds"]
        info["params_sha256"][unit] = rec["params_sha256"]
        info["best_epoch"][unit] = rec["best_epoch"]
        if "adaptation" in rec:
            info["adaptation"] = rec["adaptation"]
        if "finetune_lr" in rec:
            info["finetune_lr"] = rec["finetune_lr"]

    for name in cfg.algos:
        key, k_init, k_train = jax.random.split(key, 3)
        done = _load_unit(ctx, seed, name)
        if done is not None:
            log_fn(f"seed {seed} {name}: finished earlier, results read from {unit_paths(ctx.workdir, seed, name)[1]}")
            info["resumed"].append(name)
            record(name, done)
            continue
        learner, eval_fn = fns.learner(spec, name), fns.eval(spec, name)
        tr = _train_unit(ctx, seed, name, log_fn, cfg, lambda **kw: meta_train(
            learner, fns.step(spec, name), eval_fn, init_fn(k_init), sd.train, sd.val, cfg, k_train, scale,
            log_fn=log_fn, mesh=fns.mesh, **kw))  # fmt: skip
        log_fn(f"seed {seed} {name}: best epoch {tr.best_epoch}, val MAE {tr.best_val_mae:.4f}, {tr.seconds:.1f}s"
               + (f" (resumed from step {tr.resumed_from})" if tr.resumed_from is not None else ""))  # fmt: skip
        scores = {s: {} for s in TEST_SCENARIOS}
        for s, t in sd.test.items():
            out = predict_tasks(eval_fn, tr.params, t, cfg.eval_chunk)
            scores[s][name] = score(out["pred"], t, scale, cfg.k)
            if name == cfg.algos[0] and "no_adapt" in cfg.baselines:
                # the first meta-learner's initialisation, not adapted
                scores[s]["no_adapt"] = score(out["pred_init"], t, scale, cfg.k)
        rec = {"scores": scores, "history": tr.history, "seconds": tr.seconds, "params_sha256": tr.params_sha256,
               "best_epoch": tr.best_epoch, "best_val_mae": tr.best_val_mae, "steps": tr.steps}  # fmt: skip
        if name == cfg.algos[0] and cfg.get("adaptation_curves", False):
            rec["adaptation"] = {"algo": name, **adaptation_curves(fns, spec, name, tr.params, sd, cfg, scale)}
        _save_unit(ctx, seed, name, rec)
        record(name, rec)

    if "finetune" in cfg.baselines:
        key, k_init, k_train = jax.random.split(key, 3)
        done = _load_unit(ctx, seed, "finetune")
        if done is not None:
            log_fn(f"seed {seed} finetune: finished earlier, results read back")
            info["resumed"].append("finetune")
            record("finetune", done)
        else:
            ft_cfg = ml_collections.ConfigDict(cfg.to_dict())
            ft_cfg.epochs = cfg.finetune_epochs
            # conventional training: no inner loop (0 steps), every training rating in the loss; early
            # stopping on the validation users' query MAE without adaptation.
            plain = dict(inner_steps=0, adapt="all")
            tr = _train_unit(ctx, seed, "finetune", log_fn, ft_cfg, lambda **kw: meta_train(
                fns.learner(spec, "maml", **plain), fns.step(spec, "maml", **plain), fns.eval(spec, "maml", **plain),
                init_fn(k_init), pooled(sd.train), sd.val, ft_cfg, k_train, scale, mesh=fns.mesh, **kw))  # fmt: skip
            t_trained = time.time()
            best_lr, best_mae = None, np.inf
            for lr in cfg.finetune_lrs:
                out = predict_tasks(fns.eval(spec, "maml", inner_lr=lr, adapt="all"), tr.params, sd.val, cfg.eval_chunk)
                m = score(out["pred"], sd.val, scale, cfg.k)["mae"]
                if m < best_mae:
                    best_lr, best_mae = lr, m
            ft_eval = fns.eval(spec, "maml", inner_lr=best_lr, adapt="all")
            scores = {s: {"finetune": score(predict_tasks(ft_eval, tr.params, t, cfg.eval_chunk)["pred"], t, scale, cfg.k)}
                      for s, t in sd.test.items()}  # fmt: skip
            rec = {"scores": scores, "history": tr.history, "seconds": tr.seconds + time.time() - t_trained,
                   "params_sha256": tr.params_sha256, "best_epoch": tr.best_epoch, "best_val_mae": tr.best_val_mae,
                   "steps": tr.steps, "finetune_lr": best_lr}  # fmt: skip
            _save_unit(ctx, seed, "finetune", rec)
            record("finetune", rec)
            log_fn(f"seed {seed} finetune: lr {best_lr} (val MAE {best_mae:.4f}), {rec['seconds']:.1f}s")

    tr_r = sd.split.train_ratings
    for name in cfg.baselines:
        if name in ("no_adapt", "finetune"):
            continue
        t0 = time.time()
        model = mbaselines.make_baseline(name, seed=seed) if name == "mf" else mbaselines.make_baseline(name)
        state = model.fit(tr_r["user_id"].to_numpy(), tr_r["item_id"].to_numpy(), tr_r["rating"].to_numpy())
        for s, sets in sd.test_sets.items():
            pred = model.predict(state, sets.support_item, sets.support_rating, sets.support_mask,
                                 sets.query_item, sets.query_mask, sets.user_id)  # fmt: skip
            results[s][name] = score(np.asarray(pred), sd.test[s], scale, cfg.k)
        info["seconds"][name] = time.time() - t0
    results["_info"] = info
    return results


# ----------------------------------------------------------------------------------------------
# all seeds
# ----------------------------------------------------------------------------------------------
# config fields that may change between a run and its --resume (they do not change what was computed
# so far, or are needed to recover from a non-finite loss); any other difference is refused.
RESUME_MUTABLE = (
    "epochs", "patience", "meta_lr", "inner_lr", "clip_norm", "weight_decay", "ckpt_every", "keep_checkpoints",
    "log_every", "eval_chunk", "all_devices", "data_dir", "download", "baselines", "seeds", "curve_steps",
    "curve_support", "adaptation_curves", "finetune_lrs",
)  # fmt: skip


def validate_config(cfg) -> None:
    """Raise ``ValueError`` naming the option and what is allowed."""
    bad = [a for a in cfg.algos if a not in META_ALGOS]
    if bad:
        raise ValueError(f"unknown --algo {bad}; valid: {', '.join(META_ALGOS)}")
    bad = [b for b in cfg.baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"unknown --baselines {bad}; valid: {', '.join(BASELINES)}")
    for name in ("algos", "baselines", "seeds"):
        dup = sorted({str(v) for v in cfg[name] if list(cfg[name]).count(v) > 1})
        if dup:
            raise ValueError(f"--{name.rstrip('s') if name == 'algos' else name} lists {dup} more than once")
    if cfg.model not in MODELS:
        raise ValueError(f"--model={cfg.model!r}; valid: {', '.join(MODELS)}")
    choices = TF_ADAPT_CHOICES if cfg.model == "transformer" else ADAPT_CHOICES
    if cfg.adapt not in choices:
        raise ValueError(f"--adapt={cfg.adapt!r} for --model={cfg.model}; valid: {', '.join(choices)}")
    if cfg.init_from and cfg.model != "transformer":
        raise ValueError("--init_from needs --model=transformer (it loads a pretrained history encoder)")
    if "context" in cfg.adapt and cfg.context_dim < 1:
        raise ValueError(f"--adapt={cfg.adapt} needs --context_dim >= 1")
    if not cfg.seeds:
        raise ValueError("--seeds must name at least one seed")
    if any(int(s) < 0 for s in cfg.seeds):
        raise ValueError(f"--seeds must be non-negative integers, got {list(cfg.seeds)}")
    for name, lo in (("inner_steps", 0), ("meta_batch", 1), ("epochs", 1), ("eval_chunk", 1), ("patience", 1)):
        if cfg[name] < lo:
            raise ValueError(f"--{name} must be >= {lo}, got {cfg[name]}")
    for name in ("inner_lr", "meta_lr"):
        if not cfg[name] > 0:
            raise ValueError(f"--{name} must be > 0, got {cfg[name]}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.all_devices and cfg.meta_batch % jax.device_count():
        raise ValueError(
            f"--meta_batch={cfg.meta_batch} must be divisible by the {jax.device_count()} devices used by --all_devices"
        )
    if cfg.chunk_size and cfg.meta_batch % cfg.chunk_size:
        raise ValueError(f"--meta_batch={cfg.meta_batch} must be a multiple of --chunk_size={cfg.chunk_size} (0 = no chunks)")
    if not 0 <= cfg.feature_dropout < 1:
        raise ValueError(f"--feature_dropout must be in [0, 1), got {cfg.feature_dropout}")
    for name, lo in (("ckpt_every", 0), ("keep_checkpoints", 1), ("log_every", 0)):
        if name in cfg and cfg[name] < lo:
            raise ValueError(f"--{name} must be >= {lo}, got {cfg[name]}")
    for name, lo in (("curve_steps", 0), ("curve_support", 1)):
        if name in cfg and any(int(v) < lo for v in cfg[name]):
            raise ValueError(f"--{name} values must be integers >= {lo}, got {list(cfg[name])}")


def config_diff(old: dict, new: dict) -> list[str]:
    """Names of top-level config fields whose values differ (or exist on one side only)."""
    return sorted(k for k in set(old) | set(new) if old.get(k, "<missing>") != new.get(k, "<missing>"))


def _prepare_workdir(cfg, workdir: str, resume: bool, data_sha256: str, log_fn) -> list[str]:
    """Check ``workdir`` against ``resume`` and the saved config; write ``config.json``. Returns the
    config fields that changed since the saved run (only :data:`RESUME_MUTABLE` ones are allowed)."""
    os.makedirs(workdir, exist_ok=True)
    cfg_path = os.path.join(workdir, "config.json")
    state = [p for p in ("config.json", "units", "checkpoints") if os.path.exists(os.path.join(workdir, p))]
    changed: list[str] = []
    if state and not resume:
        raise ValueError(
            f"--workdir={workdir} already holds a run ({', '.join(state)}); pass --resume to continue it, "
            "--overwrite to start it again, or choose another --workdir"
        )
    if resume and os.path.exists(cfg_path):
        saved = read_json(cfg_path)
        changed = config_diff(saved["config"], cfg.to_dict())
        # fields added to the code after the run started (absent from its config.json) are accepted
        added = [k for k in changed if k not in saved["config"]]
        if added:
            log_fn(f"--resume: config fields new since the run started (their defaults are used): {', '.join(added)}")
        fixed = [k for k in changed if k not in RESUME_MUTABLE and k not in added]
        if fixed:
            detail = "; ".join(f"{k}: {saved['config'].get(k)!r} -> {cfg.to_dict().get(k)!r}" for k in fixed)
            raise ValueError(
                f"--resume: the run in {workdir} was started with a different config ({detail}); only "
                f"{', '.join(RESUME_MUTABLE)} may change on resume. Use the original flags or a fresh --workdir"
            )
        if saved.get("data_sha256") not in (None, data_sha256):
            raise ValueError(
                f"--resume: the data changed since the run in {workdir} started (ratings sha256 "
                f"{saved['data_sha256'][:12]}... -> {data_sha256[:12]}...); use a fresh --workdir"
            )
        if changed:
            log_fn(f"resuming with changed settings: {', '.join(changed)}")
    elif resume:
        log_fn(f"--resume: nothing to resume in {workdir}; starting a fresh run")
    write_json_atomic(cfg_path, {"config": cfg.to_dict(), "data_sha256": data_sha256})
    return changed


def run(
    cfg, data: mdata.RatingsData | None = None, log_fn: Callable = print, compiled: Compiled | None = None, *,
    workdir: str | None = None, resume: bool = False, progress: bool = False, argv: list[str] | None = None,
) -> dict:  # fmt: skip
    """Every seed, then mean and sample std over seeds, in PROTOCOL.md's results format.
    ``compiled`` may carry jitted steps over from an earlier call with the same config.

    With ``workdir``: ``config.json`` and ``run.json`` (command, package versions, devices, git
    commit), per-unit checkpoints and results, ``metrics.jsonl``/``metrics.csv`` (+ TensorBoard if
    ``tensorboardX`` is installed) are written there; ``resume`` continues an interrupted run (see
    :func:`run_seed`). Without it nothing is written (library/test use). The caller writes
    ``results.json`` (see ``experiments/meta_train.py``).
    """
    validate_config(cfg)
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    data_sha = mdata.data_checksum(data)
    meta = run_metadata(cfg.to_dict(), argv)
    ctx = RunContext(progress=progress, provenance={"data_sha256": data_sha, "command": meta["command"],
                                                    "versions": meta["versions"]})  # fmt: skip
    changed: list[str] = []
    if workdir is not None:
        changed = _prepare_workdir(cfg, workdir, resume, data_sha, log_fn)
        ctx.workdir, ctx.resume = workdir, resume
        ctx.metrics = MetricsWriter(workdir, tensorboard=True)
        runs_path = os.path.join(workdir, "run.json")
        history = read_json(runs_path).get("invocations", []) if resume and os.path.exists(runs_path) else []
        write_json_atomic(runs_path, meta | {"invocations": history + [meta["command"]]})
    per_seed = {}
    compiled = compiled or Compiled(cfg)
    try:
        for seed in cfg.seeds:
            log_fn(f"=== seed {seed}")
            per_seed[seed] = run_seed(data, seed, cfg, log_fn, compiled, ctx)
    finally:
        if ctx.metrics is not None:
            ctx.metrics.close()
    results = {}
    for s in TEST_SCENARIOS:
        results[s] = {}
        methods = per_seed[cfg.seeds[0]][s].keys()
        for m in methods:
            metrics = per_seed[cfg.seeds[0]][s][m].keys()
            results[s][m] = {
                k: mmetrics.mean_std_over_seeds([per_seed[seed][s][m][k] for seed in cfg.seeds]) for k in metrics
            }
    first = per_seed[cfg.seeds[0]]["_info"]
    out = {
        "dataset": data.name,
        "protocol": cfg.protocol,
        "seeds": list(cfg.seeds),
        "config": cfg.to_dict(),
        "scenarios": {s: {"n_users": first["n_users"][s]} for s in TEST_SCENARIOS}
        | {"warm_train": {"n_users": first["n_train_users"] + first["n_val_users"]}},
        "results": results,
        "per_seed": {str(seed): {s: r[s] for s in TEST_SCENARIOS} for seed, r in per_seed.items()},
        "training": {str(seed): r["_info"] for seed, r in per_seed.items()},
        "data": {"source": data.source, "format": data.format, "cleaning": data.report, "sha256": data_sha},
        "command": meta["command"],
        "versions": meta["versions"],
        "run": {k: meta[k] for k in ("devices", "backend", "git_commit", "platform", "started_utc")}
        | {"resumed_with_changes": changed},
    }  # fmt: skip
    curves = [per_seed[seed]["_info"].get("adaptation") for seed in cfg.seeds]
    if curves and all(c is not None for c in curves):
        out["adaptation"] = aggregate_curves(curves)
    return out


def aggregate_curves(curves: list[dict]) -> dict:
    """Mean and sample std over seeds of :func:`adaptation_curves` outputs (points present in every
    seed only); ``n_users`` of the support curve is the mean over seeds."""
    agg: dict = {"algo": curves[0]["algo"], "n_seeds": len(curves), "steps": {}, "support": {}}
    for s in curves[0]["steps"]:
        ks = [k for k in curves[0]["steps"][s] if all(k in c["steps"].get(s, {}) for c in curves)]
        agg["steps"][s] = {k: mmetrics.mean_std_over_seeds([c["steps"][s][k] for c in curves]) for k in ks}
    for s in curves[0]["support"]:
        ns = [n for n in curves[0]["support"][s] if all(n in c["support"].get(s, {}) for c in curves)]
        agg["support"][s] = {
            n: {"mae": mmetrics.mean_std_over_seeds([c["support"][s][n]["mae"] for c in curves]),
                "n_users": float(np.mean([c["support"][s][n]["n_users"] for c in curves]))}
            for n in ns
        }  # fmt: skip
    return agg


def format_table(res: dict, metrics=TABLE_METRICS) -> str:
    """One table: scenario x method x metric, mean ± std over seeds."""
    seeds = res["seeds"]
    cfg = res["config"]
    lines = [
        f"{res['dataset']} / protocol {res['protocol']} / seeds {seeds} / query 10 per user / "
        f"adapt '{cfg['adapt']}' {cfg['inner_steps']} steps lr {cfg['inner_lr']} / "
        f"metrics averaged over users, mean ± sample std over seeds; predictions clipped to the scale",
    ]
    header = f"{'scenario':15s} {'method':12s}" + "".join(f"{m:>18s}" for m in metrics)
    lines += [header, "-" * len(header)]
    for s in TEST_SCENARIOS:
        n = res["scenarios"][s]["n_users"]
        for m, vals in res["results"][s].items():
            cells = []
            for k in metrics:
                v = vals.get(k)
                cells.append(f"{v['mean']:9.4f} ± {v['std']:.4f}" if v else f"{'':>18s}")
            lines.append(f"{s + f' ({n})':15s} {m:12s}" + "".join(f"{c:>18s}" for c in cells))
        lines.append("")
    return "\n".join(lines)
