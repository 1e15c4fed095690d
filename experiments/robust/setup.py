"""The pieces the robustness experiment assembles per seed: the recommended method's config, its
standard / adversarial learners and steps, the attacked evaluation, and the seed's data with
injected fake profiles."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from experiments.coldstart import build
from experiments.coldstart.configs import default as coldstart_default
from experiments.coldstart.draws import training_draws
from metarec import data as mdata
from metarec.data.injection import Injection, make_injection, poison
from metarec.meta import robust
from metarec.meta.inner import mse, scaled_sse, shrunk_mse
from metarec.meta.step import make_meta_step
from metarec.models.registry import get_model
from metarec.training.meta_train import make_optimizer

# fields of the experiment's config that override the method's (cold-start) config
SHARED = ("dataset", "data_dir", "download", "seeds", "epochs", "patience", "eval_chunk", "k")


def method_config(cfg) -> tuple[str, ml_collections.ConfigDict]:
    """``(learner name, config)`` of ``cfg.method`` as the cold-start experiment runs it (tuned
    settings from ``tuned.json``), with the experiment's shared fields on top."""
    base = coldstart_default.get_config()
    for f in SHARED:
        base[f] = cfg[f]
    base.algos = (cfg.method,)
    base.baselines = ()
    algo, mcfg = build.method_config(base, cfg.method)
    build.validate_config(mcfg)
    return algo, mcfg


def loss_of(mcfg):
    """The set loss the method's learner trains with (as :func:`build.build_learner` picks it)."""
    if mcfg.loss_sum_scale:
        return scaled_sse(mcfg.loss_sum_scale)
    return shrunk_mse(mcfg.loss_prior) if mcfg.loss_prior else mse


class Models:
    """The method's model twice -- as trained (frozen tables) and with ``freeze_tables=False``
    (identical forward values; the attack's gradient path) -- and memoised learners, steps and
    attacked-evaluation functions (shared by seeds: parameter shapes do not depend on the seed)."""

    def __init__(self, cfg, algo: str, mcfg):
        self.cfg, self.algo, self.mcfg = cfg, algo, mcfg
        ucfg = ml_collections.ConfigDict(mcfg.to_dict())
        ucfg.cf_freeze_tables = False
        self.frozen, self.free = build.Compiled(mcfg), build.Compiled(ucfg)
        self.cache: dict = {}

    def _get(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def init_fn(self, spec):
        return self.frozen.model(spec)[0]

    def eval(self, spec):
        return self.frozen.eval(spec, self.algo)

    def learner(self, spec, eps: float = 0.0, lam: float = 0.0):
        """The method's learner; adversarially trained when ``eps > 0`` and ``lam > 0``."""
        cfg = self.cfg

        def make():
            return robust.adversarial(
                self.frozen.learner(spec, self.algo),
                self.frozen.model(spec)[1],
                loss_of(self.mcfg),
                eps=eps,
                lam=lam,
                method=cfg.train_attack,
                steps=cfg.train_steps,
                relative=cfg.relative,
                pattern=cfg.attack_filter,
                where=cfg.where,
                attack_learner=self.free.learner(spec, self.algo),
                attack_apply_fn=self.free.model(spec)[1],
            )

        return self._get(("learner", spec, eps, lam), make)

    def step(self, spec, eps: float = 0.0, lam: float = 0.0):
        m = self.mcfg
        return self._get(
            ("step", spec, eps, lam),
            lambda: make_meta_step(
                self.learner(spec, eps, lam),
                make_optimizer(m),
                clip_norm=m.clip_norm or None,
                chunk_size=m.chunk_size or None,
            ),
        )

    def attacked(self, spec, method: str):
        """``fn(meta_params, tasks, eps) -> {"pred", "loss"}``: ``method`` ("pgd" / "fgsm") on the
        tables, then adaptation and prediction (:func:`robust.make_attacked_predict`)."""
        cfg = self.cfg

        def make():
            attack = robust.make_attack(
                self.free.learner(spec, self.algo),
                self.free.model(spec)[1],
                mse,  # the attacker maximises the query MSE of the deployed recommender
                method=method,
                steps=cfg.pgd_steps,
                start=cfg.pgd_start,
                relative=cfg.relative,
                pattern=cfg.attack_filter,
            )
            return robust.make_attacked_predict(
                self.frozen.learner(spec, self.algo),
                self.frozen.model(spec)[1],
                attack,
                pattern=cfg.attack_filter,
            )

        return self._get(("attacked", spec, method), make)


def injection_for(data: mdata.RatingsData, sd: build.SeedData, cfg, seed: int) -> Injection:
    """The seed's fake profiles against its training ratings (seeded by ``seed``)."""
    return make_injection(
        sd.fit_ratings,
        data.users,
        fraction=cfg.inject_fraction,
        n_filler=cfg.inject_filler,
        n_targets=cfg.inject_targets,
        kind=cfg.inject_kind,
        scale=data.rating_scale,
        seed=seed,
    )


def poisoned_seed(
    data: mdata.RatingsData, sd: build.SeedData, mcfg, seed: int, inj: Injection
) -> build.SeedData:
    """``sd`` with the fake profiles in its training ratings, so they reach everything that trains:
    the MF item tables (``table_ratings``), the kNN features (``fit_ratings``), the meta-training
    tasks (the rating pool; fake ids come after every real id, so the real users' held-out query
    sets and per-epoch draws are the clean run's), the encoder's global mean. Scenarios, validation
    and test users are the clean split's (drawn before the injection), as
    :func:`build.prepare_seed` makes them."""
    ratings, users = poison(sd.fit_ratings, data.users, inj)
    pdata = dataclasses.replace(data, users=users)
    encoder = mdata.FeatureEncoder.fit(
        pdata,
        ratings,
        offset_prior=mcfg.offset_prior,
        stable_shapes=True,
        unseen_years=mcfg.unseen_years,
    )
    if encoder.spec != sd.encoder.spec:
        raise ValueError("profile injection changed the feature vocabularies")
    prepare = get_model(mcfg.model).prepare_tasks
    width = sd.width

    def enc(s: mdata.UserSets):
        return prepare(encoder.encode(s.pad_support(width)))

    training = training_draws(ratings, mcfg, seed)
    return dataclasses.replace(
        sd,
        encoder=encoder,
        train=enc(sd.train_sets),
        val=enc(sd.val_sets),
        test={k: enc(v) for k, v in sd.test_sets.items()},
        encode=enc,
        fit_ratings=ratings,
        samplers={m: (lambda e, d=d: enc(d(e))) for m, d in training["draws"].items()},
        _views={},
        **training,
    )


def target_sets(sets: mdata.UserSets, targets: np.ndarray) -> mdata.UserSets:
    """``sets`` with every user's query set replaced by the target items (unrated: rating 0):
    what each user would be predicted for the pushed items after adapting on their support."""
    n, q = sets.n_users, len(targets)
    return dataclasses.replace(
        sets,
        query_item=np.tile(np.asarray(targets, sets.query_item.dtype), (n, 1)),
        query_rating=np.zeros((n, q), sets.query_rating.dtype),
        query_mask=np.ones((n, q), sets.query_mask.dtype),
        query_time=np.zeros((n, q), sets.query_time.dtype),
    )
