"""Robust meta-learning experiment: the recommended method (``cf_metasgd``) trained as usual and
adversarially, evaluated under embedding attacks and under profile injection.

Per seed (the cold-start protocol's split, :func:`experiments.coldstart.build.prepare_seed`):

1. ``standard``: the method meta-trained as the cold-start experiment trains it (early stopping on
   validation MAE); ``adv_e<eps>_l<lam>``: the same with adversarial meta-training
   (:func:`metarec.meta.robust.adversarial`). On the first seed every candidate of ``cfg.grid``
   is trained and the one with the lowest validation MAE under PGD at ``cfg.budget`` plus clean
   validation MAE is chosen (validation users only); the other seeds train the chosen one.
2. Attack evaluation of both on the four test scenarios: MAE / RMSE / nDCG@3 after PGD at every
   budget of ``cfg.eval_eps`` (0 = clean) and FGSM at ``cfg.fgsm_eps``, and the MAE increase over
   the clean MAE.
3. Profile injection (:mod:`metarec.data.injection`): fake users appended to the training ratings
   (MF tables, kNN features, meta-training tasks: :func:`setup.poisoned_seed`); both trainings
   repeated on the poisoned data (``*_poison`` units); the clean test users' MAE / nDCG@3 and the
   mean predicted rating of the pushed target items for the test users (shift vs clean training).

Units (a training, or the evaluation of one) are saved under ``units/seed<s>/`` (trained
parameters as ``.npz``); ``--resume`` reads finished units back and continues an unfinished
training from its checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from experiments.coldstart.build import TEST_SCENARIOS, prepare_seed
from experiments.coldstart.pipeline import RunContext, load_unit, save_unit, train_unit
from experiments.coldstart.tables import deployed, fold_tables, initial_params
from experiments.common import (
    TRAINING_RUN_FILES,
    check_choice,
    enable_compilation_cache,
    prepare_workdir,
    split_names,
    train_log,
    write_results,
)
from experiments.robust import report, setup
from metarec import data as mdata
from metarec import metrics as mmetrics
from metarec.data.injection import KINDS
from metarec.meta import robust
from metarec.training.meta_train import meta_train, predict_tasks, score
from metarec.training.runlog import MetricsWriter
from metarec.training.workdir import open_run

METRICS = ("mae", "rmse", "ndcg@3")
RESUME_MUTABLE = ("data_dir", "download", "seeds", "eval_chunk", "progress", "report")
RUN_FILES = TRAINING_RUN_FILES


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def parse_grid(values) -> list[tuple[float, float]]:
    """``("0.25:0.5", ...)`` -> ``[(eps_train, lam), ...]``."""
    out = []
    for v in split_names(values):
        try:
            eps, lam = (float(x) for x in v.split(":"))
        except ValueError:
            raise ValueError(f"--config.grid: {v!r} is not eps_train:lam (e.g. 0.5:0.5)") from None
        if not (eps > 0 and 0 < lam <= 1):
            raise ValueError(f"--config.grid: {v!r} needs eps_train > 0 and 0 < lam <= 1")
        out.append((eps, lam))
    if not out:
        raise ValueError("--config.grid must name at least one eps_train:lam candidate")
    return out


def validate_config(cfg) -> None:
    """Normalise comma lists in place; ``ValueError`` naming ``--config.<field>`` otherwise."""
    try:
        cfg.seeds = tuple(int(s) for s in split_names(cfg.seeds))
        cfg.eval_eps = tuple(float(e) for e in split_names(cfg.eval_eps))
    except ValueError:
        raise ValueError("--config.seeds / --config.eval_eps take comma lists of numbers") from None
    cfg.grid = tuple(split_names(cfg.grid))
    parse_grid(cfg.grid)
    if cfg.method != "cf_metasgd":
        raise ValueError(
            f"--config.method={cfg.method!r}; allowed: cf_metasgd (the recommended method)"
        )
    if not cfg.eval_eps or 0.0 not in cfg.eval_eps or min(cfg.eval_eps) < 0:
        raise ValueError(
            f"--config.eval_eps must contain 0 and no negative value, got {cfg.eval_eps}"
        )
    if cfg.budget not in cfg.eval_eps or not cfg.budget > 0:
        raise ValueError(f"--config.budget={cfg.budget} must be > 0 and one of --config.eval_eps")
    for field in ("fgsm_eps",):
        if not cfg[field] > 0:
            raise ValueError(f"--config.{field} must be > 0, got {cfg[field]}")
    for field in ("pgd_steps", "train_steps", "inject_filler", "inject_targets"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"--config.{field} must be an integer >= 1, got {cfg[field]!r}")
    check_choice("--config.pgd_start", cfg.pgd_start, robust.STARTS)
    check_choice("--config.train_attack", cfg.train_attack, robust.METHODS)
    check_choice("--config.where", cfg.where, robust.WHERE)
    check_choice("--config.inject_kind", cfg.inject_kind, KINDS)
    if not 0 < cfg.inject_fraction <= 1:
        raise ValueError(f"--config.inject_fraction must be in (0, 1], got {cfg.inject_fraction}")
    setup.method_config(cfg)  # the method's own checks (seeds, epochs, ...)


# ----------------------------------------------------------------------------------------------
# one seed
# ----------------------------------------------------------------------------------------------
def unit_name(eps: float, lam: float) -> str:
    return "standard" if eps == 0 or lam == 0 else f"adv_e{eps:g}_l{lam:g}"


def _params_path(ctx: RunContext, seed: int, unit: str) -> str:
    return os.path.join(ctx.workdir, "units", f"seed{seed}", f"{unit}.params.npz")


class SeedRun:
    """One seed's data (clean and poisoned, lazily), models and units."""

    def __init__(self, data, seed: int, cfg, models: setup.Models, ctx: RunContext, log_fn):
        self.data, self.seed, self.cfg, self.models, self.ctx = data, seed, cfg, models, ctx
        self.log = log_fn
        mcfg = models.mcfg
        self.sd = prepare_seed(data, seed, mcfg)
        self.spec = self.sd.encoder.spec
        self.inj = setup.injection_for(data, self.sd, cfg, seed)
        self.views: dict[bool, tuple] = {}
        self.params: dict[str, object] = {}
        self.records: dict[str, dict] = {}

    def view(self, poisoned: bool):
        """``(tasks as the method reads them, deploy function)`` of the clean or poisoned data."""
        if poisoned not in self.views:
            mcfg = self.models.mcfg
            sd = self.sd
            if poisoned:
                sd = setup.poisoned_seed(self.data, self.sd, mcfg, self.seed, self.inj)
            msd = sd.view(mcfg)
            self.views[poisoned] = (sd, msd, deployed(msd, mcfg, self.seed))
        return self.views[poisoned]

    def train(self, eps: float, lam: float, poisoned: bool = False) -> dict:
        """Train (or read back) one unit; its record holds validation scores and the history."""
        unit = unit_name(eps, lam) + ("_poison" if poisoned else "")
        if unit in self.records:
            return self.records[unit]
        m, mcfg, spec = self.models, self.models.mcfg, self.spec
        k_init, k_train = jax.random.split(jax.random.PRNGKey(self.seed))
        learner = m.learner(spec, eps, lam)
        done = load_unit(self.ctx, self.seed, unit)
        if done is not None:
            leaves = np.load(_params_path(self.ctx, self.seed, unit))
            template = jax.eval_shape(lambda: learner.init(m.init_fn(spec)(k_init)))
            treedef = jax.tree_util.tree_structure(template)
            self.params[unit] = jax.tree_util.tree_unflatten(
                treedef, [leaves[f"arr_{i}"] for i in range(treedef.num_leaves)]
            )
            self.log(f"seed {self.seed} {unit}: finished earlier, read back")
            self.records[unit] = done
            return done
        sd, msd, deploy = self.view(poisoned)
        params0 = initial_params(m.init_fn(spec), k_init, sd, mcfg, self.seed)
        ev = m.eval(spec)

        def eval_fn(meta, tasks):
            return ev(deploy(meta), tasks)

        def train_fn(**kw):
            return meta_train(
                learner,
                m.step(spec, eps, lam),
                eval_fn,
                params0,
                msd.train_tasks(mcfg.train_tasks),
                msd.val,
                mcfg,
                k_train,
                self.data.rating_scale,
                log_fn=self.log,
                epoch_params=fold_tables(sd, mcfg, self.seed),
                **kw,
            )

        tr = train_unit(self.ctx, self.seed, unit, self.log, mcfg, train_fn)
        val = self.attack_scores(tr.params, msd.val, deploy, "pgd", self.cfg.budget)
        rec = {
            "eps_train": eps,
            "lam": lam,
            "poisoned": poisoned,
            "history": tr.history,
            "best_epoch": tr.best_epoch,
            "val_mae": tr.best_val_mae,
            "val_pgd_mae": val["mae"],
            "objective": val["mae"] + tr.best_val_mae,
            "seconds": tr.seconds,
            "params_sha256": tr.params_sha256,
        }
        self.params[unit] = tr.params
        self.records[unit] = rec
        if self.ctx.workdir is not None:
            path = _params_path(self.ctx, self.seed, unit)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path, *[np.asarray(a) for a in jax.tree_util.tree_leaves(tr.params)])
        save_unit(self.ctx, self.seed, unit, rec)
        self.log(
            f"seed {self.seed} {unit}: best epoch {tr.best_epoch}, val MAE {tr.best_val_mae:.4f}, "
            f"val MAE under PGD@{self.cfg.budget:g} {val['mae']:.4f}, {tr.seconds:.1f}s"
        )
        return rec

    def attack_scores(self, params, tasks, deploy, method: str, eps: float) -> dict:
        fn = self.models.attacked(self.spec, method)
        out = predict_tasks(
            lambda meta, b: fn(meta, b, eps), deploy(params), tasks, self.cfg.eval_chunk
        )
        s = score(out["pred"], tasks, self.data.rating_scale, self.cfg.k)
        return {k: s[k] for k in METRICS}

    def target_mean(self, params, poisoned: bool) -> dict[str, float]:
        """Mean predicted rating of the pushed targets for each scenario's test users."""
        sd, msd, deploy = self.view(poisoned)
        ev = self.models.eval(self.spec)
        out = {}
        for s in TEST_SCENARIOS:
            tasks = msd.encode(setup.target_sets(sd.test_sets[s], self.inj.targets))
            pred = predict_tasks(lambda m, b: ev(deploy(m), b), params, tasks, self.cfg.eval_chunk)[
                "pred"
            ]
            out[s] = float(np.mean(np.clip(pred, *self.data.rating_scale)))
        return out

    def evaluate(self, unit: str, poisoned: bool) -> dict:
        """Test evaluation of a trained unit (after selection): attacks on clean-trained units,
        clean scores on poisoned ones; the targets' mean prediction for both."""
        name = unit + "_test"
        done = load_unit(self.ctx, self.seed, name)
        if done is not None:
            return done
        t0 = time.time()
        sd, msd, deploy = self.view(poisoned)
        params = self.params[unit]
        cfg = self.cfg
        rec: dict = {"targets": self.target_mean(params, poisoned)}
        for s in TEST_SCENARIOS:
            t = msd.test[s]
            budgets = cfg.eval_eps if not poisoned else (0.0,)
            rec[s] = {
                "pgd": {str(e): self.attack_scores(params, t, deploy, "pgd", e) for e in budgets}
            }
            if not poisoned:
                rec[s]["fgsm"] = {
                    str(cfg.fgsm_eps): self.attack_scores(params, t, deploy, "fgsm", cfg.fgsm_eps)
                }
        rec["seconds"] = time.time() - t0
        save_unit(self.ctx, self.seed, name, rec)
        return rec


def select(run: SeedRun, grid) -> dict:
    """Train every candidate on this seed and choose by validation (never a test number)."""
    cands = []
    for eps, lam in grid:
        rec = run.train(eps, lam)
        cands.append(
            {
                "eps_train": eps,
                "lam": lam,
                "val_mae": rec["val_mae"],
                "val_pgd_mae": rec["val_pgd_mae"],
                "objective": rec["objective"],
            }
        )
    best = min(cands, key=lambda c: c["objective"])
    return {"seed": run.seed, "candidates": cands, "chosen": best}


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def run(
    cfg,
    data: mdata.RatingsData | None = None,
    log_fn: Callable = print,
    *,
    workdir: str | None = None,
    resume: bool = False,
    argv: list[str] | None = None,
) -> dict:
    validate_config(cfg)
    algo, mcfg = setup.method_config(cfg)
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    data_sha = mdata.data_checksum(data)
    ctx = RunContext(progress=cfg.progress)
    meta = {"command": None, "versions": {}}
    if workdir is not None:
        meta, _ = open_run(
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
        ctx.metrics = MetricsWriter(workdir)
    ctx.provenance = {"data_sha256": data_sha, "command": meta.get("command")}
    models = setup.Models(cfg, algo, mcfg)
    grid = parse_grid(cfg.grid)
    per_seed, selection, injected = {}, None, {}
    try:
        for seed in cfg.seeds:
            log_fn(f"=== seed {seed}")
            r = SeedRun(data, seed, cfg, models, ctx, log_fn)
            injected[str(seed)] = r.inj.summary()
            log_fn(
                f"seed {seed}: injected {r.inj.n_users} fake users, {r.inj.n_ratings} ratings "
                f"({cfg.inject_kind}, targets {r.inj.targets.tolist()})"
            )
            r.train(0.0, 0.0)
            if selection is None:
                selection = select(r, grid)
                c = selection["chosen"]
                log_fn(
                    f"chosen on seed {seed}'s validation users: eps_train {c['eps_train']}, "
                    f"lam {c['lam']} (objective {c['objective']:.4f})"
                )
            eps, lam = selection["chosen"]["eps_train"], selection["chosen"]["lam"]
            r.train(eps, lam)
            units = {"standard": "standard", "robust": unit_name(eps, lam)}
            out = {k: r.evaluate(u, False) for k, u in units.items()}
            for k, u in units.items():
                r.train(*((0.0, 0.0) if k == "standard" else (eps, lam)), poisoned=True)
                out[k + "_poison"] = r.evaluate(u + "_poison", True)
            per_seed[seed] = out
    finally:
        if ctx.metrics is not None:
            ctx.metrics.close()
    return aggregate(cfg, data, per_seed, selection, injected, meta, data_sha)


def _ms(values) -> dict:
    return mmetrics.mean_std_over_seeds(values)


def aggregate(cfg, data, per_seed, selection, injected, meta, data_sha) -> dict:
    seeds = list(per_seed)
    attack, injection, target = {}, {}, {}
    b = str(cfg.budget)
    for s in TEST_SCENARIOS:
        attack[s], injection[s] = {}, {}
        for model in ("standard", "robust"):
            recs = [per_seed[seed][model][s] for seed in seeds]
            pgd = {
                e: {m: _ms([r["pgd"][e][m] for r in recs]) for m in METRICS} for e in recs[0]["pgd"]
            }
            inc = {e: _ms([r["pgd"][e]["mae"] - r["pgd"]["0.0"]["mae"] for r in recs]) for e in pgd}
            fg = {
                e: {m: _ms([r["fgsm"][e][m] for r in recs]) for m in METRICS}
                for e in recs[0]["fgsm"]
            }
            fg_inc = {
                e: _ms([r["fgsm"][e]["mae"] - r["pgd"]["0.0"]["mae"] for r in recs]) for e in fg
            }
            attack[s][model] = {
                "pgd": pgd,
                "mae_increase": inc,
                "fgsm": fg,
                "fgsm_mae_increase": fg_inc,
            }
            pois = [per_seed[seed][model + "_poison"] for seed in seeds]
            clean = [per_seed[seed][model] for seed in seeds]
            injection[s][model] = {
                "clean": {m: _ms([r[s]["pgd"]["0.0"][m] for r in clean]) for m in METRICS},
                "poisoned": {m: _ms([r[s]["pgd"]["0.0"][m] for r in pois]) for m in METRICS},
                "mae_change": _ms(
                    [
                        p[s]["pgd"]["0.0"]["mae"] - c[s]["pgd"]["0.0"]["mae"]
                        for p, c in zip(pois, clean)
                    ]
                ),
                "target_mean_clean": _ms([c["targets"][s] for c in clean]),
                "target_mean_poisoned": _ms([p["targets"][s] for p in pois]),
                "target_shift": _ms(
                    [p["targets"][s] - c["targets"][s] for p, c in zip(pois, clean)]
                ),
            }
        std_inc = attack[s]["standard"]["mae_increase"][b]["mean"]
        rob_inc = attack[s]["robust"]["mae_increase"][b]["mean"]
        # a scenario whose tasks read no attacked row (new items only: the content path) is not
        # affected by the attack at all: the target does not apply there
        applies = abs(std_inc) > 1e-6 or abs(rob_inc) > 1e-6
        target[s] = {
            "standard_increase": std_inc,
            "robust_increase": rob_inc,
            "reduction": std_inc - rob_inc,
            "relative_reduction": (std_inc - rob_inc) / std_inc if applies and std_inc else None,
            "met": bool(rob_inc < std_inc) if applies else None,
        }
    target["all_met"] = all(target[s]["met"] is not False for s in TEST_SCENARIOS)
    target["budget"] = cfg.budget
    return {
        "dataset": data.name,
        "protocol": "melu",
        "seeds": seeds,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "threat_model": {
            "tables": cfg.attack_filter,
            "ball": "per-row L2, radius eps x RMS row norm" if cfg.relative else "per-row L2, eps",
            "attacker": "white box, maximises query MSE after adaptation on the perturbed support",
            "pgd_steps": cfg.pgd_steps,
            "pgd_start": cfg.pgd_start,
        },
        "selection": selection,
        "target": target,
        "attack": attack,
        "injection": injection,
        "injected": injected,
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "data_sha256": data_sha,
        "command": meta.get("command"),
        "versions": meta.get("versions", {}),
    }


# ----------------------------------------------------------------------------------------------
# the script body
# ----------------------------------------------------------------------------------------------
def main(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> dict:
    """Run, write ``results.json`` / ``results.md`` / ``report/robust_attack.png``, print the
    tables. ``train_log.txt`` gets every log line; the terminal the ones that are not indented."""
    validate_config(cfg)
    enable_compilation_cache()
    prepare_workdir(workdir, "robust", RUN_FILES, overwrite=overwrite)
    t0 = time.time()
    with train_log(workdir, resume) as log_fn:
        res = run(cfg, log_fn=log_fn, workdir=workdir, resume=resume, argv=argv)
    res["wall_seconds"] = time.time() - t0
    write_results(workdir, res, report.tables(res), fenced=False)
    if cfg.report:
        print(f"figure: {report.plot_attack(res, os.path.join(workdir, 'report'))}")
    return res
