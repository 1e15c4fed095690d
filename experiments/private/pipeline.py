"""User-level differentially private meta-training: the privacy-utility table and curve.

Per seed (PROTOCOL.md's "melu" split; warm training users split again into training and
validation users as in the cold-start experiment):

1. Private data: every rating of the training users (the warm training users minus the validation
   users), as a pool of users that can form a task (``n_users``); ``delta = 1 / n_users``.
   Public by declaration (read freely): the item catalogue and content, the user demographics,
   the rating scale, and the validation users (a held-out selection set, not in the pool). The
   feature encoder is built from public data only (every user's demographics, the catalogue's
   existing items by release year, the rating scale's midpoint as the prior mean), not from the
   training ratings.
2. Per target epsilon, the noise multiplier is calibrated from (q, steps, delta) with
   :mod:`metarec.meta.accounting`; :func:`metarec.training.private_train.private_train` runs
   ``steps`` DP steps (Poisson sampling at ``q = expected_batch / n_users``, per-user clipping,
   Gaussian noise) with fresh task draws every step, and releases the last parameters. epsilon =
   inf is the same variant, sampling and steps without noise and without clipping.
3. ``l2_clip`` and ``meta_lr`` (unless fixed in the config) are chosen by a grid at
   ``select.epsilon`` on seed ``select.seed``, by the validation users' MAE of the released
   parameters; no test scenario is encoded for the grid.
4. Evaluation: the 4 test scenarios, MAE / RMSE / nDCG@3 after adapting on each test user's support
   set (on the user's side: it costs no privacy), mean and sample std over seeds.

Workdir: ``results.json``, ``results.md``, ``report/privacy_utility.png``, ``config.json``,
``run.json``, ``metrics.jsonl``/``.csv``, ``train_log.txt``, ``checkpoints/<unit>``,
``units/<unit>.json``; ``--resume`` reads finished units back and continues unfinished ones from
their newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import pandas as pd

from experiments.coldstart import build
from experiments.coldstart.configs import default as coldstart_default
from experiments.coldstart.tables import initial_params
from experiments.common import (
    TRAINING_RUN_FILES,
    enable_compilation_cache,
    prepare_workdir,
    split_names,
    train_log,
    write_results,
)
from experiments.private.report import format_table, plot
from metarec import data as mdata
from metarec import metrics as mmetrics
from metarec.data.poisson import poisson_capacity
from metarec.data.scenarios import new_items
from metarec.meta import accounting
from metarec.meta.private import make_dp_meta_step
from metarec.models.registry import get_model
from metarec.training.checkpoint import Checkpointer
from metarec.training.meta_train import evaluate, make_optimizer, predict_tasks
from metarec.training.private_train import PrivacySettings, private_train
from metarec.training.runlog import MetricsWriter, read_json, write_json_atomic
from metarec.training.workdir import open_run

# the recommended method's architecture without anything that reads training ratings outside
# the private computation (kNN and MF features, MF item tables)
PRIVATE_VARIANT = {
    "cf_knn": False,
    "cf_knn_mf": False,
    "cf_mf_tables": False,
    "cf_table_init": 0.1,
    "cf_freeze_tables": False,
    "train_tasks": "resample",
}
PUBLIC = (
    "item catalogue and content (release year, genres)",
    "user demographics (age, gender, occupation, zip code)",
    "the rating scale",
    "validation users (a held-out selection set, not in the private training pool)",
)
SCENARIOS = build.TEST_SCENARIOS
TABLE_METRICS = ("mae", "rmse", "ndcg@3")
RESUME_MUTABLE = ("data_dir", "download", "seeds", "progress", "report", "log_every")
RUN_FILES = TRAINING_RUN_FILES


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def _floats(field: str, value, *, allow_inf: bool = False) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in split_names(value))
    except ValueError:
        out = ()
    ok = out and all(v > 0 and (allow_inf or math.isfinite(v)) for v in out)
    if not ok or len(set(out)) != len(out):
        allowed = "positive numbers or inf" if allow_inf else "positive numbers"
        raise ValueError(
            f"--config.{field}={value!r}: a comma list of distinct {allowed}, e.g. "
            + ("1,2,4,8,inf" if allow_inf else "0.3,1.0")
        )
    return out


def _pairs(field: str, value) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple(tuple(int(x) for x in v.split(":")) for v in split_names(value))
    except ValueError:
        out = ()
    if not out or any(len(p) != 2 or min(p) < 1 for p in out) or len(set(out)) != len(out):
        raise ValueError(
            f"--config.{field}={value!r}: a comma list of distinct expected_batch:steps pairs of "
            "positive integers, e.g. 64:250,128:150"
        )
    return out


@dataclasses.dataclass(frozen=True)
class Spec:
    """The resolved config: parsed lists and the method's (private variant) config."""

    epsilons: tuple[float, ...]
    grid_clip: tuple[float, ...]
    grid_lr: tuple[float, ...]
    grid_batch_steps: tuple[tuple[int, int], ...]
    algo: str
    mcfg: ml_collections.ConfigDict


def resolve(cfg) -> Spec:
    """Check ``cfg`` (one ``ValueError`` naming ``--config.<field>`` and what is allowed)."""
    mdata.check_dataset(cfg.dataset)
    seeds = split_names(cfg.seeds) if isinstance(cfg.seeds, str) else cfg.seeds
    try:
        cfg.seeds = tuple(int(s) for s in seeds)
    except ValueError:
        raise ValueError(f"--config.seeds={cfg.seeds!r}: a comma list of integers") from None
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or min(cfg.seeds) < 0:
        raise ValueError(f"--config.seeds={cfg.seeds}: distinct non-negative integers")
    for name, lo in (("steps", 0), ("expected_batch", 0), ("chunk_size", 1), ("eval_chunk", 1)):
        if not isinstance(cfg[name], int) or cfg[name] < lo:
            raise ValueError(f"--config.{name}={cfg[name]!r}: an integer >= {lo}")
    if bool(cfg.steps) != bool(cfg.expected_batch):
        raise ValueError(
            f"--config.steps={cfg.steps} and --config.expected_batch={cfg.expected_batch}: both "
            "> 0 (fixed) or both 0 (chosen from --config.select.batch_steps)"
        )
    for name in ("eval_every", "ckpt_every", "log_every"):
        if not isinstance(cfg[name], int) or cfg[name] < 0:
            raise ValueError(f"--config.{name}={cfg[name]!r}: an integer >= 0 (0: off)")
    if not (0 <= cfg.delta < 1):
        raise ValueError(f"--config.delta={cfg.delta}: in [0, 1) (0: 1 / n_users)")
    if cfg.accountant not in accounting.ACCOUNTANTS:
        raise ValueError(
            f"--config.accountant={cfg.accountant!r}; allowed: {', '.join(accounting.ACCOUNTANTS)}"
        )
    for name in ("l2_clip", "meta_lr", "capacity_std"):
        if not cfg[name] >= 0:
            raise ValueError(f"--config.{name}={cfg[name]}: >= 0 (l2_clip/meta_lr 0: selected)")
    epsilons = _floats("epsilons", cfg.epsilons, allow_inf=True)
    if not (cfg.select.epsilon > 0 and math.isfinite(cfg.select.epsilon)):
        raise ValueError(f"--config.select.epsilon={cfg.select.epsilon}: a finite number > 0")
    cc = coldstart_default.get_config()
    if cfg.method not in cc.methods:
        raise ValueError(f"--config.method={cfg.method!r}; allowed: {', '.join(cc.methods)}")
    algo, mcfg = build.method_config(cc, cfg.method)
    if mcfg.model != "hybrid":
        raise ValueError(
            f"--config.method={cfg.method!r}: the private variant needs a hybrid model"
        )
    mcfg = ml_collections.ConfigDict(mcfg.to_dict())
    for k, v in PRIVATE_VARIANT.items():
        mcfg[k] = v
    mcfg.dataset, mcfg.k = cfg.dataset, cfg.k
    # the same training data for the selection grid (no test scenario encoded) and the final runs
    mcfg.val_new_items = 0.0
    return Spec(
        epsilons=epsilons,
        grid_clip=(cfg.l2_clip,) if cfg.l2_clip else _floats("select.l2_clip", cfg.select.l2_clip),
        grid_lr=(cfg.meta_lr,) if cfg.meta_lr else _floats("select.meta_lr", cfg.select.meta_lr),
        grid_batch_steps=(
            ((cfg.expected_batch, cfg.steps),)
            if cfg.steps
            else _pairs("select.batch_steps", cfg.select.batch_steps)
        ),
        algo=algo,
        mcfg=mcfg,
    )


# ----------------------------------------------------------------------------------------------
# data: public encoder, private pool
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PrivateSeed:
    """One seed's data: ``sd`` (validation and test tasks, encoded from public data), ``pool``
    (step -> one fresh task per private training user), ``n_users``."""

    sd: build.SeedData
    pool: Callable
    n_users: int


def public_encoder(data: mdata.RatingsData, offset_prior: float) -> mdata.FeatureEncoder:
    """A feature encoder from public data only: every user's demographics, the existing items (by
    the protocol's public release-year rule; new items stay out of the vocabulary, as in the
    non-private encoder) and the rating scale's midpoint as the prior mean of a user's offset."""
    users = data.users["user_id"].to_numpy()
    items = np.setdiff1d(data.items["item_id"].to_numpy(), new_items(data))
    n = max(len(users), len(items))
    frame = pd.DataFrame(
        {
            "user_id": np.resize(users, n),
            "item_id": np.resize(items, n),
            "rating": np.full(n, sum(data.rating_scale) / 2, np.float32),
        }
    )
    return mdata.FeatureEncoder.fit(data, frame, offset_prior=offset_prior, stable_shapes=True)


def prepare_private(data: mdata.RatingsData, seed: int, mcfg, *, test: bool) -> PrivateSeed:
    """The seed's split (``test=False``: no test scenario encoded), re-encoded with
    :func:`public_encoder`, and the private pool of training users."""
    sd = build.prepare_seed(data, seed, mcfg, test=test)
    encoder = public_encoder(data, mcfg.offset_prior)
    prepare = get_model(mcfg.model).prepare_tasks

    def enc(s: mdata.UserSets):
        return prepare(encoder.encode(s.pad_support(sd.width)))

    sd = dataclasses.replace(
        sd,
        encoder=encoder,
        encode=enc,
        train=enc(sd.train_sets),
        val=enc(sd.val_sets),
        test={k: enc(v) for k, v in sd.test_sets.items()},
        samplers={},
        draws={},
        _views={},
    )
    private = sd.fit_ratings[~sd.fit_ratings["user_id"].isin(sd.val_sets.user_id)]
    pool = mdata.rating_pool(private, min_ratings=mcfg.task_min_support + 1)
    sizes = build.TASK_SIZES["melu"]

    def draw(step: int):
        rng = np.random.default_rng([seed, step])
        return enc(mdata.sample_user_sets(pool, rng, min_support=mcfg.task_min_support, **sizes))

    return PrivateSeed(sd=sd, pool=draw, n_users=pool.n_users)


# ----------------------------------------------------------------------------------------------
# units: one private training run each (checkpointed, read back on --resume)
# ----------------------------------------------------------------------------------------------
def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _num(x: float):
    """JSON-safe number (``inf`` as the string ``"inf"``)."""
    return "inf" if isinstance(x, float) and math.isinf(x) else x


@dataclasses.dataclass
class Context:
    workdir: str | None = None
    resume: bool = False
    metrics: MetricsWriter | None = None
    progress: bool = False
    log_fn: Callable = print
    provenance: dict = dataclasses.field(default_factory=dict)


class Runner:
    """Seeds' data, compiled functions and optimizers shared by every unit of a run."""

    def __init__(self, cfg, spec: Spec, data: mdata.RatingsData, ctx: Context):
        self.cfg, self.spec, self.data, self.ctx = cfg, spec, data, ctx
        self.fns = build.Compiled(spec.mcfg)
        self._seeds: dict = {}
        self._opts: dict = {}

    def seed_data(self, seed: int, test: bool) -> PrivateSeed:
        if (seed, test) not in self._seeds:
            self._seeds = {k: v for k, v in self._seeds.items() if k[0] == seed}
            self._seeds[seed, test] = prepare_private(self.data, seed, self.spec.mcfg, test=test)
        return self._seeds[seed, test]

    def optimizer(self, lr: float):
        if lr not in self._opts:
            c = ml_collections.ConfigDict(
                {"meta_lr": lr, "weight_decay": self.spec.mcfg.weight_decay}
            )
            self._opts[lr] = make_optimizer(c)
        return self._opts[lr]

    def paths(self, unit: str) -> tuple[str, str]:
        w = self.ctx.workdir
        return os.path.join(w, "checkpoints", unit), os.path.join(w, "units", f"{unit}.json")

    def unit(self, seed: int, unit: str, eps: float, hp: dict, *, test: bool):
        """Train (or read back) one private run with ``hp`` (``l2_clip``, ``meta_lr``,
        ``expected_batch``, ``steps``); with ``test`` also score the test scenarios."""
        ctx, cfg = self.ctx, self.cfg
        if ctx.workdir is not None and ctx.resume and os.path.exists(self.paths(unit)[1]):
            ctx.log_fn(f"{unit}: finished earlier, read back from {self.paths(unit)[1]}")
            return read_json(self.paths(unit)[1])
        ps = self.seed_data(seed, test)
        n = ps.n_users
        clip, lr, batch, steps = (hp[k] for k in ("l2_clip", "meta_lr", "expected_batch", "steps"))
        q = min(1.0, batch / n)
        delta = cfg.delta or 1.0 / n
        private = not math.isinf(eps)
        sigma = accounting.calibrate_noise(eps, q, steps, delta, cfg.accountant)
        settings = PrivacySettings(
            clip if private else math.inf, sigma, q, steps, delta, cfg.accountant
        )
        spec = ps.sd.encoder.spec
        algo = self.spec.algo
        learner, eval_fn = self.fns.learner(spec, algo), self.fns.eval(spec, algo)
        k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
        params0 = initial_params(self.fns.model(spec)[0], k_init, ps.sd, self.spec.mcfg, seed)
        opt = self.optimizer(lr)
        step = make_dp_meta_step(
            learner,
            opt,
            l2_clip=settings.l2_clip,
            noise_multiplier=sigma,
            expected_batch_size=batch if private else None,
            chunk_size=cfg.chunk_size,
        )
        capacity = poisson_capacity(n, q, cfg.capacity_std, cfg.chunk_size)
        scale = self.data.rating_scale

        def train(checkpointer=None):
            return private_train(
                step,
                opt,
                eval_fn,
                learner,
                params0,
                ps.pool,
                ps.sd.val,
                settings,
                k_train,
                scale,
                capacity=capacity,
                chunk_size=cfg.chunk_size,
                eval_every=cfg.eval_every,
                eval_chunk=cfg.eval_chunk,
                k=cfg.k,
                ckpt_every=cfg.ckpt_every,
                log_every=cfg.log_every,
                log_fn=ctx.log_fn,
                checkpointer=checkpointer,
                resume=ctx.resume,
                metrics=ctx.metrics,
                unit=unit,
                progress=ctx.progress,
            )

        if ctx.workdir is None:
            res = train()
        else:
            ckpt_dir = self.paths(unit)[0]
            with Checkpointer(ckpt_dir, keep_last=cfg.keep_checkpoints, keep_best=1) as ck:
                if ck.latest_step() is not None and not ctx.resume:
                    raise ValueError(
                        f"{ckpt_dir} already holds checkpoints; pass --resume to continue or use "
                        "a fresh --workdir"
                    )
                res = train(ck)
        rec = {
            "seed": seed,
            "unit": unit,
            "epsilon_target": _num(eps),
            "epsilon": _num(res.epsilon),
            "delta": delta,
            "sigma": sigma,
            "l2_clip": _num(settings.l2_clip),
            "meta_lr": lr,
            "q": q,
            "expected_batch": batch,
            "steps": res.steps,
            "n_users": n,
            "capacity": capacity,
            "mean_sampled": res.mean_sampled,
            "truncated": res.truncated,
            "mean_clipped": res.mean_clipped,
            "dropped": res.dropped,
            "val_mae": res.final_val_mae,
            "history": res.history,
            "seconds": res.seconds,
            "params_sha256": res.params_sha256,
        }
        if test:
            rec["scores"] = {
                s: evaluate(
                    predict_tasks(eval_fn, res.params, t, cfg.eval_chunk)["pred"], t, scale, cfg.k
                )[0]
                for s, t in ps.sd.test.items()
            }
            rec["n_test_users"] = {s: int(t.num_tasks) for s, t in ps.sd.test.items()}
        ctx.log_fn(
            f"{unit}: epsilon {_num(res.epsilon)} (target {eps_label(eps)}, delta {delta:.2e}), "
            f"sigma {sigma:.3f}, val MAE {res.final_val_mae:.4f}, {res.seconds:.1f}s"
            + (f", {res.truncated} truncated" if res.truncated else "")
        )
        if ctx.workdir is not None:
            write_json_atomic(self.paths(unit)[1], ctx.provenance | rec)
        return rec


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def select(runner: Runner) -> dict:
    """The chosen ``{"l2_clip", "meta_lr", "expected_batch", "steps"}`` with ``"how"`` and the
    ``"grid"``: every combination of the config's lists at ``select.epsilon`` on seed
    ``select.seed``, by the validation users' MAE of the released parameters (a single
    combination, fixed in the config, skips the grid)."""
    cfg, spec = runner.cfg, runner.spec
    combos = [
        {"l2_clip": c, "meta_lr": lr, "expected_batch": b, "steps": n}
        for b, n in spec.grid_batch_steps
        for c in spec.grid_clip
        for lr in spec.grid_lr
    ]
    if len(combos) == 1 and cfg.l2_clip and cfg.meta_lr and cfg.steps:
        return combos[0] | {"how": "fixed in the config"}
    eps, seed = float(cfg.select.epsilon), int(cfg.select.seed)
    grid = []
    for hp in combos:
        unit = (
            f"select/b{hp['expected_batch']}_s{hp['steps']}_clip{hp['l2_clip']:g}_"
            f"lr{hp['meta_lr']:g}"
        )
        grid.append(hp | {"val_mae": runner.unit(seed, unit, eps, hp, test=False)["val_mae"]})
    best = min(grid, key=lambda g: g["val_mae"])
    return {k: best[k] for k in combos[0]} | {
        "how": (
            f"grid at target epsilon {eps:g}, seed {seed}: lowest validation-user MAE of the "
            "released (last) parameters; no test scenario encoded"
        ),
        "epsilon": eps,
        "seed": seed,
        "grid": grid,
    }


def run(cfg, *, workdir=None, resume=False, progress=False, argv=None, log_fn=print) -> dict:
    """Selection, then every (seed, epsilon); returns the ``results.json`` payload."""
    t0 = time.time()
    spec = resolve(cfg)
    data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    data_sha = mdata.data_checksum(data)
    ctx = Context(progress=progress, log_fn=log_fn)
    if workdir is not None:
        meta, changed = open_run(
            workdir,
            cfg.to_dict(),
            resume=resume,
            mutable=RESUME_MUTABLE,
            data_sha256=data_sha,
            state=("config.json", "units", "checkpoints"),
            argv=argv,
            log_fn=log_fn,
        )
        ctx.workdir, ctx.resume = workdir, resume
        ctx.metrics = MetricsWriter(workdir, tensorboard=False)
        ctx.provenance = {"data_sha256": data_sha, "command": meta["command"]}
    else:
        meta, changed = {"command": None, "versions": {}}, []
    runner = Runner(cfg, spec, data, ctx)
    try:
        chosen = select(runner)
        hp = {k: chosen[k] for k in ("l2_clip", "meta_lr", "expected_batch", "steps")}
        log_fn(f"chosen: {hp}")
        units = {
            (seed, eps): runner.unit(seed, f"seed{seed}/eps{eps_label(eps)}", eps, hp, test=True)
            for seed in cfg.seeds
            for eps in spec.epsilons
        }
    finally:
        if ctx.metrics is not None:
            ctx.metrics.close()
    return _payload(cfg, spec, data, chosen, units, meta, changed, data_sha, time.time() - t0)


def _payload(cfg, spec, data, chosen, units, meta, changed, data_sha, seconds) -> dict:
    seeds = list(cfg.seeds)
    results = {s: {} for s in SCENARIOS}
    privacy = []
    for eps in spec.epsilons:
        recs = [units[seed, eps] for seed in seeds]
        lab = eps_label(eps)
        for s in SCENARIOS:
            results[s][lab] = {
                m: mmetrics.mean_std_over_seeds([r["scores"][s][m] for r in recs])
                for m in TABLE_METRICS
            }
        privacy.append(
            {
                "label": lab,
                "epsilon_target": _num(eps),
                "epsilon_achieved": [r["epsilon"] for r in recs],
                "sigma": [r["sigma"] for r in recs],
                "q": [r["q"] for r in recs],
                "steps": recs[0]["steps"],
                "delta": [r["delta"] for r in recs],
                "n_users": [r["n_users"] for r in recs],
                "l2_clip": recs[0]["l2_clip"],
                "expected_batch": recs[0]["expected_batch"],
                "truncated": sum(r["truncated"] for r in recs),
                "mean_clipped": [r["mean_clipped"] for r in recs],
                "val_mae": [r["val_mae"] for r in recs],
                "seconds": [r["seconds"] for r in recs],
            }
        )
    first = units[seeds[0], spec.epsilons[0]]
    return {
        "dataset": data.name,
        "protocol": "melu",
        "seeds": seeds,
        "method": cfg.method,
        "algo": spec.algo,
        "variant": PRIVATE_VARIANT,
        "public": list(PUBLIC),
        "guarantee": (
            "user-level (epsilon, delta)-DP of the released meta-parameters w.r.t. adding or "
            "removing one training user (all their ratings); delta = 1/n_users; Poisson sampling, "
            f"{cfg.accountant.upper()} accountant (dp-accounting)"
        ),
        "selection": chosen,
        "privacy": privacy,
        "scenarios": {s: {"n_users": first["n_test_users"][s]} for s in SCENARIOS},
        "results": results,
        "per_seed": {
            str(seed): {eps_label(e): units[seed, e]["scores"] for e in spec.epsilons}
            for seed in seeds
        },
        "config": cfg.to_dict(),
        "command": meta.get("command"),
        "versions": meta.get("versions"),
        "data_sha256": data_sha,
        "resumed_with_changes": changed,
        "wall_s": round(seconds, 1),
    }


def _quiet_accountant(record: logging.LogRecord) -> bool:
    # dp-accounting's RDP accountant warns for every order whose series does not converge at small
    # noise and leaves that order out; the epsilon of the remaining orders is still an upper bound
    return "failed to converge" not in record.getMessage()


def main(cfg, workdir: str, *, resume=False, overwrite=False, argv=None) -> dict:
    """The script body: run, write ``results.json`` / ``results.md`` / the figure, print tables."""
    logging.getLogger("absl").addFilter(_quiet_accountant)
    resolve(cfg)  # a bad config fails before the workdir is touched
    enable_compilation_cache()
    prepare_workdir(workdir, "private", RUN_FILES, overwrite=overwrite)
    with train_log(workdir, resume) as log_fn:
        res = run(
            cfg, workdir=workdir, resume=resume, progress=cfg.progress, argv=argv, log_fn=log_fn
        )
    write_results(workdir, res, format_table(res))
    if cfg.report:
        print(f"figure: {plot(res, os.path.join(workdir, 'report', 'privacy_utility.png'))}")
    return res
