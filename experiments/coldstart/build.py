"""Per-seed data, the config's model and learners, and their compiled steps (shared by seeds)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from experiments.coldstart.draws import CROSSFITS, TASK_SIZES, TRAIN_TASKS, training_draws
from experiments.coldstart.tuning_sets import seal_split, tuning_sets, validate_stand_ins
from experiments.common import split_names
from metarec import data as mdata
from metarec.baselines import BASELINES as FITTED_BASELINES
from metarec.baselines import make_baseline
from metarec.baselines.mf import DEFAULT_REG as MF_DEFAULT_REG
from metarec.baselines.neighbours import fit_neighbours, with_neighbours
from metarec.data.tasks import Task
from metarec.meta import LEARNERS, make_learner
from metarec.meta.inner import mse, scaled_sse, shrunk_mse, with_rank_term
from metarec.meta.step import make_eval_fn, make_mesh
from metarec.models.registry import MODELS, get_model
from metarec.training.encoder_checkpoint import load_pretrained, same_item_vocab
from metarec.training.meta_train import check_step_scales, make_step

# baselines built from the meta-learning network rather than fitted on ratings
NETWORK_BASELINES = ("no_adapt", "finetune")
BASELINES = (*FITTED_BASELINES, *NETWORK_BASELINES)
TEST_SCENARIOS = mdata.SCENARIOS
SUPPORT_WIDTH = {"melu": 100 - 10, "time": 15}  # largest support set each protocol can produce
NAME_FIELDS = ("algos", "baselines")


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
    # the ratings every method trains on: split.train_ratings minus the validation users' query
    # ratings (held out for selection); baselines, item tables and meta-training tasks use these
    fit_ratings: object = None
    # train_tasks mode -> (epoch -> training tasks drawn afresh from fit_ratings)
    samplers: dict = dataclasses.field(default_factory=dict)
    # train_tasks mode -> the ratings a model's item tables are fitted on (fit_ratings, minus the
    # held-out query sets in "resample_support"; in "crossfit" those of fold 0, see fold_ratings)
    table_ratings: dict = dataclasses.field(default_factory=dict)
    # cross-fitting mode ("crossfit", "crossfit_chrono") -> fold f's ratings, fit_ratings minus
    # fold f's held-out query sets; epoch e draws its query sets from fold (e - 1) % folds and
    # trains on features and item tables fitted on that fold's ratings (see `fold_of`)
    fold_ratings: dict = dataclasses.field(default_factory=dict)
    n_task_users: int = 0  # tasks per epoch of a sampler (users with enough training ratings)
    seed: int = 0  # the seed the data was prepared with (the MF feature's fit is seeded by it)
    # train_tasks mode -> (epoch -> the UserSets its sampler encodes)
    draws: dict = dataclasses.field(default_factory=dict)
    width: int = 0  # the support width every task is padded to
    # tuning path only (``cfg.val_new_items``): tasks of ratings of items held out of training,
    # selection's stand-in for the item-cold scenarios (tuning_sets.py)
    val_new: Task | None = None
    val_new_sets: mdata.UserSets | None = None
    # tuning path only (``cfg.val_cold_users``): the user-cold stand-in (tuning_sets.py)
    val_cold: Task | None = None
    val_cold_sets: mdata.UserSets | None = None
    # tuning path only (``cfg.val_new_model = "separate"``): the new-item stand-in's own data,
    # its items held out of training; this seed's data then holds every training item, and its
    # model scores the validation and cold users (experiments/tune/pipeline.py)
    val_new_data: SeedData | None = None
    _views: dict = dataclasses.field(default_factory=dict)

    def train_tasks(self, mode: str = "resample"):
        """What meta-training iterates over: a per-epoch sampler, or the fixed tasks."""
        return self.train if mode == "fixed" else self.samplers[mode]

    def fold_of(self, mode: str, epoch: int) -> int:
        """The cross-fitting fold whose query sets epoch ``epoch`` (from 1) trains on; 0 in
        every other mode."""
        return (epoch - 1) % len(self.fold_ratings[mode]) if mode in CROSSFITS else 0

    def training_ratings(self, mode: str, fold: int = 0):
        """The ratings that features and item tables of meta-training fold ``fold`` are fitted
        on: ``table_ratings[mode]``, or fold ``fold``'s under cross-fitting."""
        return self.fold_ratings[mode][fold] if mode in CROSSFITS else self.table_ratings[mode]

    def view(self, cfg) -> SeedData:
        """The seed's tasks as the method configured by ``cfg`` reads them: itself, or with
        ``cf_knn`` every task's examples carry ``x["nbr"]``, the neighbourhood predictions from its
        support set (:mod:`metarec.baselines.neighbours`): over the ratings the method's item
        tables are fitted on (``table_ratings[cfg.train_tasks]``) for the training tasks, over
        every training rating for validation and test tasks; with ``cf_knn_mf`` also the ``mf``
        baseline's fold-in prediction (its defaults, seeded as the baseline is) as a third
        feature; with ``cf_knn_new_own`` also ``x["nbr_new"]``, the features as if each item
        were new (with ``cf_knn_new_content``, a genre kNN as the item-kNN one). Under
        cross-fitting an epoch's tasks read features fitted on its fold's ratings
        (``training_ratings``), so no training query rating is in its own features.
        Cached per mode and feature set."""
        if not cfg.get("cf_knn", False):
            return self
        mode, with_mf = cfg.train_tasks, bool(cfg.get("cf_knn_mf", False))
        with_new = ""  # the new-item features: none, "own" or "content" (with the genre kNN)
        if cfg.get("cf_knn_new_own", False):
            with_new = "content" if cfg.get("cf_knn_new_content", False) else "own"
        if (mode, with_mf, with_new) not in self._views:
            # training tasks: the ratings the method's item tables are fitted on; validation and
            # test tasks: every training rating (what the deployed model reads, see `deployed`)
            @functools.cache
            def train_enc(fold: int) -> Callable:
                ratings = self.training_ratings(mode, fold)
                return self._neighbour_encoder(ratings, with_mf, with_new)

            enc = self._neighbour_encoder(self.fit_ratings, with_mf, with_new)
            draws = {m: d for m, d in self.draws.items() if m == mode}
            self._views[(mode, with_mf, with_new)] = dataclasses.replace(
                self,
                train=train_enc(0)(self.train_sets),
                val=enc(self.val_sets),
                val_new=None if self.val_new_sets is None else enc(self.val_new_sets),
                val_cold=None if self.val_cold_sets is None else enc(self.val_cold_sets),
                test={k: enc(v) for k, v in self.test_sets.items()},
                encode=enc,
                samplers={
                    m: (lambda e, d=d: train_enc(self.fold_of(mode, e))(d(e)))
                    for m, d in draws.items()
                },
                draws=draws,
                _views={},
            )
        return self._views[(mode, with_mf, with_new)]

    def _neighbour_encoder(self, ratings, with_mf: bool = False, with_new: str = "") -> Callable:
        """Tasks -> tasks with neighbour features fitted on ``ratings`` (``with_new``: "",
        "own", or "content" for new-item features with the genre kNN)."""
        triples = [ratings[c].to_numpy() for c in ("user_id", "item_id", "rating")]
        state = fit_neighbours(*triples)
        mf = None
        if with_mf:  # the mf baseline as the pipeline fits it (baseline_predictions)
            model = make_baseline("mf", seed=self.seed)
            mf = (model.fit(*triples), MF_DEFAULT_REG)  # fold_in_reg defaults to reg

        def enc(sets: mdata.UserSets) -> Task:
            padded = sets.pad_support(self.width)
            content = with_new == "content"
            return with_neighbours(self.encode(sets), padded, state, mf, bool(with_new), content)

        return enc


def validation_split(split: mdata.Split, val_fraction: float, seed: int):
    """``(train users, validation users)`` of the warm training users (seeded by ``seed + 2``)."""
    return mdata.split_validation(split.sets["warm_train"], val_fraction, seed + 2)


def fit_ratings_of(split: mdata.Split, val_fraction: float, seed: int):
    """The ratings every method trains on: the split's training ratings minus the validation
    users' query ratings (held out for selection; also for pretraining, which would otherwise see
    them)."""
    return mdata.drop_query_ratings(
        split.train_ratings, validation_split(split, val_fraction, seed)[1]
    )


def prepare_seed(data: mdata.RatingsData, seed: int, cfg, *, test: bool = True) -> SeedData:
    """Scenarios, vocabularies and encoded tasks for one seed; every support set padded to one
    width. ``test=False`` (the tuning path) leaves the test scenarios out: ``test`` and
    ``test_sets`` stay empty, so nothing downstream can read a test user's ratings; with
    ``cfg.val_seal_seeds`` it also drops every query rating of those seeds' test scenarios
    (:func:`~experiments.coldstart.tuning_sets.seal_split`)."""
    split = mdata.make_split(data, seed, cfg.protocol)
    empty = [k for k, v in split.sets.items() if v.n_users == 0]
    if empty:
        rule = (
            "each user needs 13..100 ratings inside the scenario"
            if cfg.protocol == "melu"
            else "each user needs at least 20 ratings inside the scenario"
        )
        sizes = {k: v.n_users for k, v in split.sets.items()}
        raise ValueError(
            f"scenario(s) {empty} are empty after filtering for {data.name} / protocol "
            f"{cfg.protocol} / seed {seed} ({rule}; sizes: {sizes}); nothing can be trained or "
            "scored there: use a larger dataset or another protocol"
        )
    if not test and cfg.get("val_seal_seeds", ()):
        split = seal_split(split, data, cfg.val_seal_seeds)
    train_sets, val_sets = validation_split(split, cfg.val_fraction, seed)
    fit_ratings = mdata.drop_query_ratings(split.train_ratings, val_sets)
    val_new_sets = val_cold_sets = None
    if not test:  # the tuning path's stand-ins for the cold scenarios (tuning_sets.py)
        n_query = TASK_SIZES[cfg.protocol]["n_query"]
        years = data.items.set_index("item_id")["year"]
        fit_ratings, train_sets, val_sets, val_new_sets, val_cold_sets = tuning_sets(
            fit_ratings, train_sets, val_sets, cfg, seed, n_query, item_years=years
        )
    # vocabularies from the training ratings only: an item rated nowhere else is out of
    # vocabulary (the learned fallback), not a row that no gradient ever reaches
    encoder = mdata.FeatureEncoder.fit(
        data,
        fit_ratings,
        offset_prior=cfg.offset_prior,
        stable_shapes=True,
        unseen_years=cfg.unseen_years,
    )
    # one support width per protocol (not per seed), so every seed shares the compiled steps
    width = max(
        [SUPPORT_WIDTH[cfg.protocol]] + [v.support_item.shape[1] for v in split.sets.values()]
    )
    prepare = get_model(cfg.model).prepare_tasks

    def enc(s: mdata.UserSets) -> Task:
        return prepare(encoder.encode(s.pad_support(width)))

    test_sets = {k: split.sets[k] for k in TEST_SCENARIOS} if test else {}
    training = training_draws(fit_ratings, cfg, seed)

    return SeedData(
        split=split,
        encoder=encoder,
        train_sets=train_sets,
        val_sets=val_sets,
        train=enc(train_sets),
        val=enc(val_sets),
        val_new=None if val_new_sets is None else enc(val_new_sets),
        val_new_sets=val_new_sets,
        val_cold=None if val_cold_sets is None else enc(val_cold_sets),
        val_cold_sets=val_cold_sets,
        test={k: enc(v) for k, v in test_sets.items()},
        test_sets=test_sets,
        encode=enc,
        fit_ratings=fit_ratings,
        samplers={m: (lambda e, d=d: enc(d(e))) for m, d in training["draws"].items()},
        width=width,
        seed=seed,
        **training,
    )


def method_config(cfg, name: str):
    """``(learner name, config)`` of the method ``name`` of ``cfg.algos``: a learner name runs on
    the base config; a key of ``cfg.methods`` is a learner (its ``algo``) run on the base config
    with that entry's other fields overriding the base fields (e.g. another model, adapt mode)."""
    if name not in cfg.methods:
        return name, cfg
    over = cfg.methods[name].to_dict()
    algo = over.pop("algo", None)
    if algo not in LEARNERS:
        raise ValueError(f"--config.methods.{name}.algo={algo!r}; allowed: {', '.join(LEARNERS)}")
    c = ml_collections.ConfigDict(cfg.to_dict())
    for k, v in over.items():
        if k not in c or k in ("methods", "algos", "baselines", "seeds", "recommended"):
            raise ValueError(
                f"--config.methods.{name}.{k}: not a per-method config field (any field of the "
                "base config except methods, algos, baselines, seeds, recommended)"
            )
        c[k] = v
    return algo, c


def baseline_predictions(
    name: str, seed: int, ratings, sets: dict[str, mdata.UserSets]
) -> dict[str, np.ndarray]:
    """Fit the fitted baseline ``name`` on ``ratings`` (MF seeded by ``seed``) and predict the
    query sets of every entry of ``sets`` from its support sets."""
    model = make_baseline(name, seed=seed) if name == "mf" else make_baseline(name)
    state = model.fit(
        ratings["user_id"].to_numpy(), ratings["item_id"].to_numpy(), ratings["rating"].to_numpy()
    )
    return {
        k: np.asarray(
            model.predict(
                state,
                v.support_item,
                v.support_rating,
                v.support_mask,
                v.query_item,
                v.query_mask,
                v.user_id,
            )
        )
        for k, v in sets.items()
    }


def check_pretrained_vocab(info: dict, path: str, encoder, seed: int) -> None:
    """A pretraining checkpoint indexes items by its split's vocabulary: refuse another seed's."""
    ids = info.get("item_ids")
    if ids is not None and not same_item_vocab(ids, encoder):
        raise ValueError(
            f"--config.init_from={path}: the checkpoint's item vocabulary is not this split's "
            f"(seed {seed}); pretrain per seed with `python -m experiments.pretrain.main "
            f"--config.seed={seed} --workdir=...` and pass --config.init_from=<dir>/seed{{seed}}"
        )


def build_learner(name: str, apply_fn: Callable, cfg, **overrides):
    """The registered learner ``name`` with the config's settings, its ``learner_options`` and
    ``overrides`` (``inner_lr``, ``inner_steps``, ``adapt``) on top."""
    opts = cfg.learner_options[name].to_dict() if name in cfg.learner_options else {}
    inner_lr = overrides.get("inner_lr", opts.pop("inner_lr", cfg.inner_lr))
    inner_steps = overrides.get("inner_steps", opts.pop("inner_steps", cfg.inner_steps))
    adapt = overrides.get("adapt") or cfg.adapt
    mask = get_model(cfg.model).adapt_filter(adapt, cfg)
    if cfg.loss_sum_scale:
        loss_fn = scaled_sse(cfg.loss_sum_scale)
    else:
        loss_fn = shrunk_mse(cfg.loss_prior) if cfg.loss_prior else mse
    if cfg.inner_newton:
        if "newton" not in LEARNERS[name].options:
            raise ValueError(
                f"--config.inner_newton: {name} takes no Newton inner steps; learners that do: "
                f"{', '.join(n for n, e in LEARNERS.items() if 'newton' in e.options)}"
            )
        opts["newton"] = cfg.inner_newton
    if cfg.outer_rank_weight:
        if "query_loss_fn" not in LEARNERS[name].options:
            raise ValueError(
                f"--config.outer_rank_weight: {name} has no separate query loss; learners that "
                f"do: {', '.join(n for n, e in LEARNERS.items() if 'query_loss_fn' in e.options)}"
            )
        opts["query_loss_fn"] = with_rank_term(loss_fn, cfg.outer_rank_weight)
    return make_learner(
        name,
        apply_fn,
        loss_fn,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        adapt_mask=mask,
        **opts,
    )


class Compiled:
    """Memo of models, learners and their jitted steps, keyed by everything that shapes them, so
    seeds with identical parameter shapes (``FeatureEncoder.fit(stable_shapes=True)``) reuse one
    compilation instead of compiling again."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.cache: dict = {}
        self.mesh = make_mesh() if cfg.all_devices else None
        self.init_from = ""
        self.pretrained = None
        self.children: dict[str, Compiled] = {}

    def for_method(self, name: str) -> tuple[str, Compiled]:
        """``(learner name, Compiled of the method's config)``; one child per method, so a method
        on another model or with other settings compiles its own steps (shared across seeds)."""
        algo, mcfg = method_config(self.cfg, name)
        if mcfg is self.cfg:
            return algo, self
        if name not in self.children:
            self.children[name] = Compiled(mcfg)
        child = self.children[name]
        child.init_from, child.pretrained = self.init_from, self.pretrained
        return algo, child

    def use_seed(self, seed: int) -> Compiled:
        """Use the seed's pretraining checkpoint (``cfg.init_from`` with ``{seed}`` filled in)."""
        self.init_from = self.cfg.init_from.format(seed=seed) if self.cfg.init_from else ""
        self.pretrained = None
        return self

    def load_pretrained(self, encoder, seed: int) -> None:
        """Load the seed's pretrained encoder (checking its vocabulary against ``encoder``)."""
        if self.init_from:
            enc_cfg, params, info = load_pretrained(self.init_from, with_metadata=True)
            check_pretrained_vocab(info, self.init_from, encoder, seed)
            self.pretrained = (enc_cfg, params)

    def _get(self, key, make):
        key = key + (self.init_from,)
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def model(self, spec):
        max_len = max(SUPPORT_WIDTH.values())

        def make():
            return get_model(self.cfg.model).build(spec, self.cfg, self.pretrained, max_len)

        return self._get(("model", spec), make)

    def learner(self, spec, name, **kw):
        key = ("learner", spec, name, tuple(sorted(kw.items())))
        return self._get(key, lambda: build_learner(name, self.model(spec)[1], self.cfg, **kw))

    def step(self, spec, name, **kw):
        key = ("step", spec, name, tuple(sorted(kw.items())))
        lookup = get_model(self.cfg.model).lookup_tables

        def make():
            cfg, tables = self.cfg, ()
            if cfg.sparse_tables and lookup is None:
                logging.info("  %s: model %s has no lookup tables: dense step", name, cfg.model)
                cfg = ml_collections.ConfigDict(cfg.to_dict() | {"sparse_tables": False})
            elif cfg.sparse_tables:
                tables = lookup(spec, cfg)
            learner = self.learner(spec, name, **kw)
            return make_step(learner, cfg, tables=tables, mesh=self.mesh, log_fn=logging.info)

        return self._get(key, make)

    def eval(self, spec, name, **kw):
        key = ("eval", spec, name, tuple(sorted(kw.items())))
        return self._get(
            key, lambda: make_eval_fn(self.learner(spec, name, **kw), self.model(spec)[1])
        )


def _check_names(field: str, values, allowed) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"--config.{field}: unknown {bad}; allowed: {', '.join(allowed)}")
    dup = sorted({v for v in values if list(values).count(v) > 1})
    if dup:
        raise ValueError(f"--config.{field} lists {dup} more than once")


def normalize_config(cfg) -> None:
    """Split comma lists given on the command line (``--config.algos=maml,metasgd``) in place and
    read integer lists as integers."""
    for field in NAME_FIELDS:
        cfg[field] = split_names(cfg[field])
    for field in ("seeds", "hidden", "cf_hidden", "curve_steps", "curve_support"):
        try:
            cfg[field] = tuple(int(v) for v in split_names(cfg[field]))
        except ValueError:
            raise ValueError(
                f"--config.{field} takes a comma list of integers, "
                f"got {','.join(map(str, cfg[field]))!r}"
            ) from None


def seed_workers(cfg, n_seeds: int) -> int:
    """How many of ``n_seeds`` seeds run at once, each in a worker process: ``cfg.seed_workers``,
    at most one per seed, and 1 off the CPU (each process would claim the accelerator's memory)."""
    import jax

    n = min(int(cfg.get("seed_workers", 1)), n_seeds)
    return n if n > 1 and jax.default_backend() == "cpu" else 1


def validate_config(cfg) -> None:
    """Raise ``ValueError`` naming the config field and what is allowed."""
    normalize_config(cfg)
    mdata.check_dataset(cfg.dataset)
    _check_names("algos", cfg.algos, tuple(dict.fromkeys((*LEARNERS, *cfg.methods))))
    _check_names("baselines", cfg.baselines, BASELINES)
    _validate_fields(cfg)
    for name in cfg.algos:
        algo, mcfg = method_config(cfg, name)
        if mcfg is not cfg:
            try:
                _validate_fields(mcfg)
            except ValueError as e:
                raise ValueError(f"method {name} ({algo}): {e}") from None
            if get_model(mcfg.model).prepare_tasks is not get_model(cfg.model).prepare_tasks:
                raise ValueError(
                    f"--config.methods.{name}.model={mcfg.model!r} reads other task inputs than "
                    f"the base model {cfg.model!r}; run it as the base model (--config.model)"
                )


def _validate_fields(cfg) -> None:
    if cfg.protocol not in SUPPORT_WIDTH:
        raise ValueError(f"--config.protocol={cfg.protocol!r}; allowed: {', '.join(SUPPORT_WIDTH)}")
    if cfg.train_tasks not in TRAIN_TASKS:
        raise ValueError(
            f"--config.train_tasks={cfg.train_tasks!r}; allowed: {', '.join(TRAIN_TASKS)}"
        )
    if cfg.model not in MODELS:
        raise ValueError(f"--config.model={cfg.model!r}; allowed: {', '.join(MODELS)}")
    validate_stand_ins(cfg)
    if cfg.unseen_years not in mdata.UNSEEN_YEARS:
        raise ValueError(
            f"--config.unseen_years={cfg.unseen_years!r}; allowed: {', '.join(mdata.UNSEEN_YEARS)}"
        )
    check_step_scales(cfg.get("step_scales", ()))
    entry = MODELS[cfg.model]
    if cfg.adapt not in entry.adapt_modes:
        raise ValueError(
            f"--config.adapt={cfg.adapt!r} for model {cfg.model}; allowed: "
            f"{', '.join(entry.adapt_modes)}"
        )
    if cfg.init_from and not entry.pretrainable:
        raise ValueError(
            f"--config.init_from needs a model that takes a pretrained encoder "
            f"({', '.join(n for n, e in MODELS.items() if e.pretrainable)})"
        )
    unknown = sorted(set(cfg.learner_options) - set(LEARNERS))
    if unknown:
        raise ValueError(
            f"--config.learner_options: unknown learner(s) {unknown}; "
            f"allowed: {', '.join(LEARNERS)}"
        )
    if (
        cfg.train_tasks in CROSSFITS
        and entry.with_item_tables is not None
        and cfg.get("cf_mf_tables", True)
        and not cfg.cf_freeze_tables
    ):
        raise ValueError(
            f"--config.train_tasks={cfg.train_tasks} swaps the model's MF item tables every "
            "epoch, so they must stay frozen: set --config.cf_freeze_tables=True (or another "
            "train_tasks)"
        )
    if cfg.get("cf_knn", False) and cfg.model != "hybrid":
        raise ValueError(f"--config.cf_knn needs --config.model=hybrid, got {cfg.model!r}")
    if "context" in cfg.adapt and cfg.context_dim < 1:
        raise ValueError(f"--config.adapt={cfg.adapt} needs --config.context_dim >= 1")
    _validate_numbers(cfg)


def _validate_numbers(cfg) -> None:
    import jax

    if not cfg.seeds:
        raise ValueError("--config.seeds must name at least one seed")
    if any(int(s) < 0 for s in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--config.seeds must be distinct non-negative integers, got {cfg.seeds}")
    lower = {
        "inner_steps": 0,
        "meta_batch": 1,
        "epochs": 1,
        "eval_chunk": 1,
        "patience": 1,
        "ckpt_every": 0,
        "keep_checkpoints": 1,
        "log_every": 0,
        "embed_dim": 1,
        "chunk_size": 0,
        "finetune_epochs": 1,
        "finetune_patience": 1,
        "k": 1,
        "task_min_support": 1,
        "cf_dim": 1,
        "crossfit_folds": 1,
    }
    for name, lo in lower.items():
        if cfg[name] < lo:
            raise ValueError(f"--config.{name} must be >= {lo}, got {cfg[name]}")
    if cfg.get("seed_workers", 1) < 1:
        raise ValueError(f"--config.seed_workers must be >= 1, got {cfg.seed_workers}")
    for name in ("inner_lr", "meta_lr"):
        if not cfg[name] > 0:
            raise ValueError(f"--config.{name} must be > 0, got {cfg[name]}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--config.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if not cfg.inner_newton >= 0:
        raise ValueError(f"--config.inner_newton must be >= 0, got {cfg.inner_newton}")
    if not cfg.loss_sum_scale >= 0:
        raise ValueError(f"--config.loss_sum_scale must be >= 0, got {cfg.loss_sum_scale}")
    if not cfg.loss_prior >= 0:
        raise ValueError(f"--config.loss_prior must be >= 0, got {cfg.loss_prior}")
    if not cfg.outer_rank_weight >= 0:
        raise ValueError(f"--config.outer_rank_weight must be >= 0, got {cfg.outer_rank_weight}")
    if not cfg.get("early_stop_ndcg_weight", 0.0) >= 0:
        raise ValueError(
            f"--config.early_stop_ndcg_weight must be >= 0, got {cfg.early_stop_ndcg_weight}"
        )
    if not cfg.cf_reg >= 0:
        raise ValueError(f"--config.cf_reg must be >= 0, got {cfg.cf_reg}")
    lrs = cfg.finetune_lrs
    if "finetune" in cfg.baselines and (not lrs or not all(float(v) >= 0 for v in lrs)):
        raise ValueError(
            f"--config.finetune_lrs={tuple(lrs)!r}; allowed: one or more step sizes >= 0 (the "
            "validation users choose among them), or leave finetune out of --config.baselines"
        )
    for name in ("id_dropout", "feature_dropout"):
        if not 0 <= cfg[name] < 1:
            raise ValueError(f"--config.{name} must be in [0, 1), got {cfg[name]}")
    new_scale = cfg.get("new_item_step_scale", -1.0)
    if not (new_scale >= 0 or new_scale == -1):
        raise ValueError(
            f"--config.new_item_step_scale must be -1 (one scale for every item) or >= 0, got "
            f"{new_scale}"
        )
    if not 0 <= cfg.cf_new_item_mean <= 1:
        raise ValueError(f"--config.cf_new_item_mean must be in [0, 1], got {cfg.cf_new_item_mean}")
    for name in ("meta_batch", "chunk_size") if cfg.all_devices else ():
        if cfg[name] % jax.device_count():  # chunk_size 0 (no chunks) passes
            raise ValueError(
                f"--config.{name}={cfg[name]} must be a multiple of the "
                f"{jax.device_count()} devices used by --config.all_devices"
            )
    if cfg.chunk_size and cfg.meta_batch % cfg.chunk_size:
        raise ValueError(
            f"--config.meta_batch={cfg.meta_batch} must be a multiple of "
            f"--config.chunk_size={cfg.chunk_size} (0 = no chunks)"
        )
    for name, lo in (("hidden", 1), ("cf_hidden", 1), ("curve_steps", 0), ("curve_support", 1)):
        if any(int(v) < lo for v in cfg[name]):
            raise ValueError(f"--config.{name} values must be integers >= {lo}, got {cfg[name]}")
