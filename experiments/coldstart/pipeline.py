"""The cold-start experiment: meta-train on warm users, evaluate every method on every scenario over
several seeds; :func:`run` returns the ``results.json`` dict of PROTOCOL.md.

Per seed (PROTOCOL.md, "melu" or "time"):

1. :func:`~experiments.coldstart.build.prepare_seed` builds the scenarios; warm_train users are
   split again into train / validation users (``val_fraction``, seeded). The training ratings of
   every method are the split's training ratings minus the validation users' query ratings;
   validation users drive early stopping; no test scenario is looked at before the final
   evaluation.
2. Each method of ``algos`` (a learner on the base config, or a ``methods`` entry: a learner with
   config overrides, e.g. the hybrid CF model) meta-trains with
   :func:`metarec.training.meta_train.meta_train` on tasks drawn afresh every epoch from the
   training ratings, keeping the best parameters by validation MAE.
3. Baselines: global/user/item means, biased MF with fold-in, user-/item-kNN (fitted on the same
   training ratings), ``no_adapt`` (the first method's initialisation, not adapted) and
   ``finetune`` (the base network trained conventionally on the pooled training tasks, then
   fine-tuned per user with the same inner loop; its step size chosen on validation users).
4. Every method predicts each test user's query ratings from the support set only; MAE, RMSE of
   predictions clipped to the rating scale, nDCG@3 (and more) of the raw scores, averaged over
   users; per-user values feed the paired tests of the recommended method
   (:mod:`experiments.coldstart.paired`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from experiments.coldstart import finetune
from experiments.coldstart.build import (
    NETWORK_BASELINES,
    TEST_SCENARIOS,
    Compiled,
    baseline_predictions,
    prepare_seed,
    seed_workers,
    validate_config,
)
from experiments.coldstart.curves import adaptation_curves, aggregate_curves
from experiments.coldstart.paired import paired_tests
from experiments.coldstart.summary import format_table
from experiments.coldstart.tables import deployed, fold_tables, initial_params
from experiments.common import (
    enable_compilation_cache,
    prepare_workdir,
    train_log,
)
from metarec import data as mdata
from metarec import metrics as mmetrics
from metarec.training.checkpoint import Checkpointer
from metarec.training.meta_train import (
    TrainResult,
    calibrate_inner_rates,
    evaluate,
    meta_train,
    new_item_params,
    predict_tasks,
    score,
)
from metarec.training.processes import map_in_processes
from metarec.training.runlog import MetricsWriter, read_json, run_metadata, write_json_atomic
from metarec.training.workdir import open_run

# the training budget and optimiser fields: mutable on resume as base fields and as a method's own
_TRAINING_FIELDS = ("epochs", "patience", "meta_lr", "inner_lr", "clip_norm", "weight_decay")
# config fields that may change between a run and its --resume (they do not change what was computed
# so far, or are needed to recover from a non-finite loss); any other difference is refused.
RESUME_MUTABLE = (
    *_TRAINING_FIELDS,
    "ckpt_every",
    "keep_checkpoints",
    "log_every",
    "eval_chunk",
    "all_devices",
    "data_dir",
    "download",
    "baselines",
    "seeds",
    "curve_steps",
    "curve_support",
    "adaptation_curves",
    "finetune_lrs",
    "progress",
    "report",
    "seed_workers",
    *(f"methods.*.{f}" for f in _TRAINING_FIELDS),
)


def unit_paths(workdir: str, seed: int, unit: str) -> tuple[str, str]:
    """``(checkpoint directory, result file)`` of one (seed, algorithm) unit inside ``workdir``."""
    return (
        os.path.join(workdir, "checkpoints", f"seed{seed}", unit),
        os.path.join(workdir, "units", f"seed{seed}", f"{unit}.json"),
    )


@dataclasses.dataclass
class RunContext:
    """Where and how :func:`run_seed` keeps its state: ``workdir`` (None: nothing written),
    ``resume`` (skip finished units, continue unfinished ones from their newest checkpoint), a
    metrics writer, whether to draw progress lines, and provenance copied into every unit file."""

    workdir: str | None = None
    resume: bool = False
    metrics: MetricsWriter | None = None
    progress: bool = False
    provenance: dict = dataclasses.field(default_factory=dict)


def train_unit(
    ctx: RunContext, seed: int, unit: str, log_fn, cfg, train_fn: Callable[..., TrainResult]
):
    """Run ``train_fn(checkpointer=..., resume=..., metrics=..., unit=..., progress=...)`` with this
    unit's checkpoint directory (or none without a workdir)."""
    if ctx.workdir is None:
        return train_fn(
            checkpointer=None,
            resume=False,
            metrics=None,
            unit=f"seed{seed}/{unit}",
            progress=ctx.progress,
        )
    ckpt_dir, _ = unit_paths(ctx.workdir, seed, unit)
    with Checkpointer(ckpt_dir, keep_last=cfg.get("keep_checkpoints", 2), keep_best=1) as ck:
        if ck.latest_step() is not None and not ctx.resume:
            raise ValueError(
                f"{ckpt_dir} already holds checkpoints; pass --resume to continue or use a fresh "
                "--workdir"
            )
        return train_fn(
            checkpointer=ck,
            resume=ctx.resume,
            metrics=ctx.metrics,
            unit=f"seed{seed}/{unit}",
            progress=ctx.progress,
        )


def load_unit(ctx: RunContext, seed: int, unit: str) -> dict | None:
    """A finished unit's saved record when resuming, else None."""
    if ctx.workdir is None or not ctx.resume:
        return None
    path = unit_paths(ctx.workdir, seed, unit)[1]
    return read_json(path) if os.path.exists(path) else None


def save_unit(ctx: RunContext, seed: int, unit: str, rec: dict) -> None:
    """Write a finished unit's record (with the run's provenance) atomically; nothing without a
    workdir."""
    if ctx.workdir is not None:
        write_json_atomic(
            unit_paths(ctx.workdir, seed, unit)[1],
            {"seed": seed, "unit": unit} | ctx.provenance | rec,
        )


def run_seed(
    data: mdata.RatingsData,
    seed: int,
    cfg,
    log_fn: Callable = print,
    compiled: Compiled | None = None,
    ctx: RunContext | None = None,
    start: int = 0,
) -> dict:
    """All methods on all scenarios for one seed: ``{scenario: {method: {metric: value}}}`` plus
    ``_info`` (scenario sizes, training histories, timings, parameter digests, adaptation curves).

    The meta-learners train in the order of ``cfg.algos`` starting at position ``start`` (then
    wrapping round); the results do not depend on it (each learner's keys are drawn in config
    order).

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
    fns.load_pretrained(sd.encoder, seed)
    key = jax.random.PRNGKey(seed)
    results = {s: {} for s in TEST_SCENARIOS}
    info = {
        "n_users": {s: int(t.num_tasks) for s, t in sd.test.items()},
        "n_train_users": int(sd.train.num_tasks),
        "n_train_task_users": sd.n_task_users,
        "n_fit_ratings": len(sd.fit_ratings),
        "n_val_users": int(sd.val.num_tasks),
        "histories": {},
        "seconds": {},
        "params_sha256": {},
        "best_epoch": {},
        "resumed": [],
        "per_user": {s: {} for s in TEST_SCENARIOS},
    }
    for s, t in sd.test.items():
        r = score(np.zeros_like(t.query.y), t, scale, cfg.k)
        results[s]["random"] = {f"ndcg@{cfg.k}": r[f"random_ndcg@{cfg.k}"]}

    def record(unit, rec):
        for s in TEST_SCENARIOS:
            results[s].update(rec["scores"][s])
            info["per_user"][s].update(rec.get("per_user", {}).get(s, {}))
        info["histories"][unit] = rec["history"]
        info["seconds"][unit] = rec["seconds"]
        info["params_sha256"][unit] = rec["params_sha256"]
        info["best_epoch"][unit] = rec["best_epoch"]
        if rec.get("step_scale") is not None:  # calibrate_inner_rates on the validation users
            info.setdefault("step_scale", {})[unit] = rec["step_scale"]
        if "adaptation" in rec:
            info["adaptation"] = rec["adaptation"]
        if "finetune_lr" in rec:
            info["finetune_lr"] = rec["finetune_lr"]

    keys = {}
    for name in cfg.algos:
        key, k_init, k_train = jax.random.split(key, 3)
        keys[name] = (k_init, k_train)
    recs, resumed = {}, set()
    start %= len(cfg.algos)
    for name in (*cfg.algos[start:], *cfg.algos[:start]):
        k_init, k_train = keys[name]
        done = load_unit(ctx, seed, name)
        if done is not None:
            log_fn(
                f"seed {seed} {name}: finished earlier, results read from "
                f"{unit_paths(ctx.workdir, seed, name)[1]}"
            )
            recs[name] = done
            resumed.add(name)
            continue
        algo, mfns = fns.for_method(name)
        mcfg = mfns.cfg
        msd = sd.view(mcfg)  # the tasks as this method reads them
        deploy = deployed(msd, mcfg, seed)  # the meta-parameters as they are evaluated
        learner, train_eval = mfns.learner(spec, algo), mfns.eval(spec, algo)

        def eval_fn(meta, tasks, train_eval=train_eval, deploy=deploy):
            return train_eval(deploy(meta), tasks)

        params0 = initial_params(mfns.model(spec)[0], k_init, sd, mcfg, seed)

        def train_fn(
            learner=learner,
            algo=algo,
            mfns=mfns,
            mcfg=mcfg,
            eval_fn=eval_fn,
            params0=params0,
            k_train=k_train,
            msd=msd,
            **kw,
        ):
            return meta_train(
                learner,
                mfns.step(spec, algo),
                eval_fn,
                params0,
                msd.train_tasks(mcfg.train_tasks),
                msd.val,
                mcfg,
                k_train,
                scale,
                log_fn=log_fn,
                mesh=mfns.mesh,
                epoch_params=fold_tables(msd, mcfg, seed),
                **kw,
            )

        tr = train_unit(ctx, seed, name, log_fn, mcfg, train_fn)
        log_fn(
            f"seed {seed} {name}: best epoch {tr.best_epoch}, val MAE {tr.best_val_mae:.4f}, "
            f"{tr.seconds:.1f}s"
            + (f" (resumed from step {tr.resumed_from})" if tr.resumed_from is not None else "")
        )
        new_scale = mcfg.get("new_item_step_scale", -1.0)
        params, step_scale, calibration = calibrate_inner_rates(
            eval_fn, tr.params, msd.val, mcfg.get("step_scales", ()), scale, cfg.k,
            cfg.eval_chunk, new_scale=new_scale,
        )  # fmt: skip
        new_params = new_item_params(tr.params, new_scale)
        if step_scale is not None:
            v = calibration[step_scale]
            log_fn(
                f"seed {seed} {name}: learned inner rates x {step_scale:g} (validation users: "
                f"MAE {v['mae']:.4f}, nDCG@{cfg.k} {v[f'ndcg@{cfg.k}']:.4f})"
                + ("" if new_params is None else f"; new items x {new_scale:g}")
            )
        scores = {s: {} for s in TEST_SCENARIOS}
        users = {s: {} for s in TEST_SCENARIOS}
        for s, t in msd.test.items():
            out = predict_tasks(eval_fn, params, t, cfg.eval_chunk, new_params)
            scores[s][name], users[s][name] = evaluate(out["pred"], t, scale, cfg.k)
            if name == cfg.algos[0] and "no_adapt" in cfg.baselines:
                # the first meta-learner's initialisation, not adapted
                scores[s]["no_adapt"], users[s]["no_adapt"] = evaluate(
                    out["pred_init"], t, scale, cfg.k
                )
        rec = {
            "scores": scores,
            "per_user": users,
            "history": tr.history,
            "seconds": tr.seconds,
            "params_sha256": tr.params_sha256,
            "best_epoch": tr.best_epoch,
            "best_val_mae": tr.best_val_mae,
            "steps": tr.steps,
            "step_scale": step_scale,
            "step_calibration": {str(k): v for k, v in calibration.items()},
        }
        if name == cfg.algos[0] and cfg.get("adaptation_curves", False):
            deployed_new = None if new_params is None else deploy(new_params)
            rec["adaptation"] = {
                "algo": name,
                **adaptation_curves(
                    mfns, spec, algo, deploy(params), msd, mcfg, scale, deployed_new
                ),
            }
        save_unit(ctx, seed, name, rec)
        recs[name] = rec
    for name in cfg.algos:  # recorded in config order, whatever order they trained in
        record(name, recs[name])
        if name in resumed:
            info["resumed"].append(name)

    if "finetune" in cfg.baselines:
        key, k_init, k_train = jax.random.split(key, 3)
        done = load_unit(ctx, seed, "finetune")
        if done is not None:
            log_fn(f"seed {seed} finetune: finished earlier, results read back")
            info["resumed"].append("finetune")
            record("finetune", done)
        else:
            tr = train_unit(
                ctx,
                seed,
                "finetune",
                log_fn,
                cfg,
                finetune.trainer(fns, sd, cfg, k_init, k_train, scale),
            )
            t_trained = time.time()
            best_lr, best_mae, ft_eval = finetune.choose_lr(fns, sd, tr.params, cfg, scale)
            evals = finetune.score_tasks(ft_eval, tr.params, sd.test, cfg, scale)
            rec = {
                "scores": {s: {"finetune": e[0]} for s, e in evals.items()},
                "per_user": {s: {"finetune": e[1]} for s, e in evals.items()},
                "history": tr.history,
                "seconds": tr.seconds + time.time() - t_trained,
                "params_sha256": tr.params_sha256,
                "best_epoch": tr.best_epoch,
                "best_val_mae": tr.best_val_mae,
                "steps": tr.steps,
                "finetune_lr": best_lr,
            }
            save_unit(ctx, seed, "finetune", rec)
            record("finetune", rec)
            log_fn(
                f"seed {seed} finetune: lr {best_lr} (val MAE {best_mae:.4f}), "
                f"{rec['seconds']:.1f}s"
            )

    for name in cfg.baselines:
        if name in NETWORK_BASELINES:
            continue
        t0 = time.time()
        preds = baseline_predictions(name, seed, sd.fit_ratings, sd.test_sets)
        for s, pred in preds.items():
            results[s][name], info["per_user"][s][name] = evaluate(pred, sd.test[s], scale, cfg.k)
        info["seconds"][name] = time.time() - t0
    results["_info"] = info
    return results


def _seed_job(seed: int, *, data, cfg, ctx: RunContext, log_fn, metrics) -> dict:
    """:func:`run_seed` in a worker process of :func:`map_in_processes` (no progress line: the
    seeds share one terminal). The seed at position ``p`` of ``cfg.seeds`` starts at meta-learner
    ``p``: the processes then compile different meta-steps at once, and each later loads the
    others' from the persistent compilation cache instead of compiling the same one alongside."""
    log_fn(f"=== seed {seed}")
    ctx = dataclasses.replace(ctx, metrics=metrics, progress=False)
    return run_seed(data, seed, cfg, log_fn, None, ctx, start=list(cfg.seeds).index(seed))


def run(
    cfg,
    data: mdata.RatingsData | None = None,
    log_fn: Callable = print,
    compiled: Compiled | None = None,
    *,
    workdir: str | None = None,
    resume: bool = False,
    progress: bool = False,
    argv: list[str] | None = None,
) -> dict:
    """Every seed, then mean and sample std over seeds, in PROTOCOL.md's results format.
    ``compiled`` may carry jitted steps over from an earlier call with the same config. With
    ``cfg.seed_workers`` > 1 (:func:`~experiments.coldstart.build.seed_workers`) seeds run at
    once, each in a process of its own (:func:`~metarec.training.processes.map_in_processes`;
    ``compiled`` is then unused): the same results, log lines and metric records, the lines of
    different seeds interleaved.

    With ``workdir``: ``config.json`` and ``run.json`` (command, package versions, devices, git
    commit), per-unit checkpoints and results, ``metrics.jsonl``/``metrics.csv`` (+ TensorBoard if
    ``tensorboardX`` is installed) are written there; ``resume`` continues an interrupted run (see
    :func:`run_seed`). Without it nothing is written (library/test use). :func:`main` writes
    ``results.json``.
    """
    validate_config(cfg)
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    data_sha = mdata.data_checksum(data)
    changed: list[str] = []
    if workdir is None:
        meta = run_metadata(cfg.to_dict(), argv)
    else:
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
    provenance = {"data_sha256": data_sha, "command": meta["command"], "versions": meta["versions"]}
    ctx = RunContext(progress=progress, provenance=provenance)
    if workdir is not None:
        ctx.workdir, ctx.resume = workdir, resume
        ctx.metrics = MetricsWriter(workdir, tensorboard=True)
    per_seed = {}
    workers = seed_workers(cfg, len(cfg.seeds))
    try:
        if workers > 1:
            log_fn(
                f"seeds {', '.join(map(str, cfg.seeds))}: {workers} at a time, each in a process "
                "of its own (--config.seed_workers); their epochs go to train_log.txt"
            )
            job = functools.partial(
                _seed_job, data=data, cfg=cfg, ctx=dataclasses.replace(ctx, metrics=None)
            )
            seeds = list(cfg.seeds)
            found = map_in_processes(job, seeds, workers, log_fn=log_fn, metrics=ctx.metrics)
            per_seed = dict(zip(seeds, found))
        else:
            compiled = compiled or Compiled(cfg)
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
                k: mmetrics.mean_std_over_seeds([per_seed[seed][s][m][k] for seed in cfg.seeds])
                for k in metrics
            }
    per_user = {str(seed): r["_info"].pop("per_user") for seed, r in per_seed.items()}
    paired = paired_tests(per_user, cfg, results)
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
        "data": {
            "source": data.source,
            "format": data.format,
            "cleaning": data.report,
            "sha256": data_sha,
        },
        "command": meta["command"],
        "versions": meta["versions"],
        "run": {k: meta[k] for k in ("devices", "backend", "git_commit", "platform", "started_utc")}
        | {"resumed_with_changes": changed},
    }
    if paired:
        out["paired"] = paired
    out["per_user"] = per_user
    curves = [per_seed[seed]["_info"].get("adaptation") for seed in cfg.seeds]
    if curves and all(c is not None for c in curves):
        out["adaptation"] = aggregate_curves(curves)
    return out


# files this experiment owns in its workdir (the only ones --overwrite deletes)
RUN_FILES = (
    "checkpoints",
    "units",
    "config.json",
    "run.json",
    "metrics.jsonl",
    "metrics.csv",
    "tb",
    "results.json",
    "per_user.json",
    "results.md",
    "report",
    "train_log.txt",
)


def main(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> dict:
    """The script body: run, write ``results.json`` / ``results.md`` / the report, print the table.
    ``train_log.txt`` gets every log line; the terminal the ones that are not indented."""
    validate_config(cfg)
    enable_compilation_cache()
    prepare_workdir(workdir, "coldstart", RUN_FILES, overwrite=overwrite)
    with train_log(workdir, resume) as log_fn:
        res = run(
            cfg, log_fn=log_fn, workdir=workdir, resume=resume, progress=cfg.progress, argv=argv
        )
    write_json_atomic(os.path.join(workdir, "per_user.json"), res.pop("per_user"))
    path = write_json_atomic(os.path.join(workdir, "results.json"), res)
    table = format_table(res)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("```\n" + table + "\n```\n")
    print()
    print(table)
    print(f"wrote {path}")
    if cfg.report:
        # imported here: matplotlib's first import logs its font cache, which must not reach a
        # bad-input error line, and after prepare_workdir that log goes to the workdir
        from experiments.report import report

        print(f"report: {report.make_report(workdir)}")
    return res
