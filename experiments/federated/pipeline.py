"""Federated meta-learning vs centralised training of the same private meta-learner.

Per seed (PROTOCOL.md's "melu" split, :func:`experiments.coldstart.build.prepare_seed`):

* the method ``cfg.method`` of the cold-start configs with the private overrides ``cfg.private``
  (no MF item tables, no kNN features: every rating is read inside the on-device computation);
* ``central``: :func:`metarec.training.meta_train.meta_train` on tasks drawn afresh every epoch
  (one per training user), early stopping on validation users;
* ``fed_iid`` / ``fed_noniid`` (full participation) and ``fed_iid_p10`` / ``fed_noniid_p10``
  (``cfg.fed.low_participation`` of the clients per round): the training users partitioned into
  clients (:mod:`metarec.data.partition`: IID, or within groups of ``cfg.fed.noniid_by``), rounds
  of :func:`metarec.meta.federated.make_round` run by
  :func:`metarec.training.federated_train.federated_train` on tasks drawn afresh every round, the
  best round by validation MAE kept;
* every setting is scored on the four test scenarios (MAE, RMSE, nDCG@3).

Validation users are a held-out selection set (their query ratings are never trained on; the
server sees them for model selection only). Each (seed, setting) is a unit: checkpointed under
``checkpoints/seed<s>/<setting>``, its scores saved to ``units/seed<s>/<setting>.json``;
``--resume`` reads finished units back and continues an unfinished one from its checkpoint.
"""

from __future__ import annotations

import math
import os
import time

import jax
import ml_collections
import numpy as np
import optax

from experiments.coldstart import build
from experiments.coldstart.configs import default as coldstart_default
from experiments.coldstart.tables import initial_params
from experiments.common import (
    TRAINING_RUN_FILES,
    enable_compilation_cache,
    format_mean_std,
    prepare_workdir,
    split_names,
    train_log,
    write_results,
)
from metarec import data as mdata
from metarec import metrics as mmetrics
from metarec.data import partition as mpart
from metarec.meta import accounting
from metarec.meta.federated import ALGORITHMS, client_settings, make_round
from metarec.training.checkpoint import Checkpointer
from metarec.training.federated_train import SAMPLING, FedSchedule, federated_train
from metarec.training.meta_train import evaluate, meta_train, predict_tasks
from metarec.training.runlog import MetricsWriter, read_json, write_json_atomic
from metarec.training.workdir import open_run

SETTINGS = {
    "central": None,
    "fed_iid": ("iid", False),
    "fed_noniid": ("noniid", False),
    "fed_iid_p10": ("iid", True),
    "fed_noniid_p10": ("noniid", True),
}
SERVER_OPTIMIZERS = ("adamw", "adam", "sgd")
TEST_SCENARIOS = build.TEST_SCENARIOS
TABLE_METRICS = ("mae", "rmse", "ndcg@3")
RUN_FILES = TRAINING_RUN_FILES
RESUME_MUTABLE = ("data_dir", "seeds", "report", "settings")


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def method_config(cfg):
    """``(learner name, method config)``: the cold-start method with the private and extra
    overrides."""
    base = coldstart_default.get_config()
    base.dataset, base.data_dir, base.seeds = cfg.dataset, cfg.data_dir, tuple(cfg.seeds)
    if cfg.method not in base.methods:
        raise ValueError(
            f"--config.method={cfg.method!r}; allowed: {', '.join(base.methods.keys())}"
        )
    algo, mcfg = build.method_config(base, cfg.method)
    for field, over in (("private", cfg.private), ("overrides", cfg.overrides)):
        for k, v in over.items():
            if k not in mcfg:
                raise ValueError(f"--config.{field}.{k}: not a field of the method's config")
            mcfg[k] = v
    return algo, mcfg


def validate_config(cfg) -> None:
    """Raise one ``ValueError`` naming ``--config.<field>`` and what is allowed."""
    cfg.settings = split_names(cfg.settings)
    cfg.fed.noniid_by = split_names(cfg.fed.noniid_by)
    try:
        cfg.seeds = tuple(int(s) for s in split_names(cfg.seeds))
    except ValueError:
        raise ValueError(
            f"--config.seeds takes a comma list of integers, got {cfg.seeds}"
        ) from None
    mdata.check_dataset(cfg.dataset)
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or min(cfg.seeds) < 0:
        raise ValueError(f"--config.seeds must be distinct non-negative integers, got {cfg.seeds}")
    bad = [s for s in cfg.settings if s not in SETTINGS]
    if not cfg.settings or bad:
        raise ValueError(f"--config.settings: unknown {bad}; allowed: {', '.join(SETTINGS)}")
    f = cfg.fed
    choices = (
        ("algorithm", f.algorithm, tuple(ALGORITHMS)),
        ("server_optimizer", f.server_optimizer, SERVER_OPTIMIZERS),
        ("sampling", f.sampling, SAMPLING),
    )
    for name, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"--config.fed.{name}={value!r}; allowed: {', '.join(allowed)}")
    bad_by = [b for b in f.noniid_by if b not in mpart.GROUP_FEATURES]
    if not f.noniid_by or bad_by:
        raise ValueError(
            f"--config.fed.noniid_by={','.join(f.noniid_by)}; allowed: a comma list of "
            f"{', '.join(mpart.GROUP_FEATURES)}"
        )
    ranges = (
        ("n_clients", f.n_clients >= 1, "an integer >= 1"),
        ("local_steps", f.local_steps >= 1, "an integer >= 1"),
        ("local_lr", f.local_lr > 0, "> 0"),
        ("client_batch", f.client_batch >= 1, "an integer >= 1"),
        ("server_lr", f.server_lr >= 0, ">= 0 (0: the method's meta_lr)"),
        ("rounds", f.rounds >= 1, "an integer >= 1"),
        ("rounds_low", f.rounds_low >= 1, "an integer >= 1"),
        ("low_participation", 0 < f.low_participation <= 1, "in (0, 1]"),
        ("eval_every", f.eval_every >= 1, "an integer >= 1"),
        ("eval_every_low", f.eval_every_low >= 1, "an integer >= 1"),
        ("patience", f.patience >= 0, "an integer >= 0"),
        ("drop_prob", 0 <= f.drop_prob < 1, "in [0, 1)"),
        ("straggler_prob", 0 <= f.straggler_prob <= 1, "in [0, 1]"),
        ("dp_clip", f.dp_clip >= 0, ">= 0 (0: no DP-FedAvg)"),
        ("dp_noise", f.dp_noise >= 0, ">= 0"),
        ("dp_epsilon", f.dp_epsilon >= 0, ">= 0 (0: use dp_noise)"),
    )
    for name, ok, allowed in ranges:
        if not ok:
            raise ValueError(f"--config.fed.{name} must be {allowed}, got {f[name]!r}")
    noisy = f.dp_noise > 0 or f.dp_epsilon > 0
    if noisy and not f.dp_clip > 0:
        raise ValueError("--config.fed.dp_noise / dp_epsilon > 0 need --config.fed.dp_clip > 0")
    if noisy and f.sampling != "poisson":
        raise ValueError(
            "--config.fed.dp_noise / dp_epsilon > 0 need --config.fed.sampling=poisson (the "
            "accountant's Poisson-sampled Gaussian mechanism)"
        )
    try:
        method_config(cfg)
    except ValueError as e:
        raise e from None


# ----------------------------------------------------------------------------------------------
# one seed
# ----------------------------------------------------------------------------------------------
def partitions(data, users: np.ndarray, cfg, seed: int) -> dict[str, list[np.ndarray]]:
    """The IID and non-IID partitions of the training task users for ``seed``."""
    f = cfg.fed
    n_clients = min(int(f.n_clients), users.size)
    groups = mpart.user_groups(data.users, users, f.noniid_by)
    max_size = math.ceil(users.size / n_clients)
    return {
        "iid": mpart.iid_partition(users, n_clients, seed),
        "noniid": mpart.feature_partition(users, groups, max_size, seed),
        "_groups": groups,
    }


def partition_info(parts, users) -> dict:
    labels = dict(zip(users.tolist(), parts["_groups"].tolist()))
    return {
        kind: mpart.sizes(parts[kind])
        | {"tv_from_population": mpart.heterogeneity(parts[kind], labels)}
        for kind in ("iid", "noniid")
    }


def server_optimizer(cfg, mcfg) -> optax.GradientTransformation:
    lr = cfg.fed.server_lr or mcfg.meta_lr
    if cfg.fed.server_optimizer == "adamw":
        return optax.adamw(lr, weight_decay=mcfg.weight_decay)
    if cfg.fed.server_optimizer == "adam":
        return optax.adam(lr)
    return optax.sgd(lr)


def dp_setting(f, participation: float, n_clients: int, rounds: int) -> dict:
    """DP-FedAvg's client-level parameters: ``{}`` without DP; with a target ``dp_epsilon`` the
    noise multiplier is calibrated for ``rounds`` rounds at delta = 1 / n_clients."""
    if not f.dp_clip:
        return {}
    delta = 1.0 / n_clients
    sigma = f.dp_noise
    if f.dp_epsilon > 0:
        sigma = accounting.calibrate_noise(f.dp_epsilon, participation, rounds, delta)
    return {"clip": f.dp_clip, "noise_multiplier": sigma, "delta": delta, "q": participation}


def dp_report(dp: dict, rounds_run: int) -> dict:
    """The DP setting with the epsilon spent by the rounds run (client-level, RDP accountant)."""
    if not dp:
        return {}
    eps = accounting.epsilon(dp["noise_multiplier"], dp["q"], int(rounds_run), dp["delta"])
    return dp | {"rounds": int(rounds_run), "epsilon": eps, "level": "client"}


class Units:
    """Where a (seed, setting) unit is checkpointed and saved (nothing without a workdir)."""

    def __init__(self, workdir: str | None, resume: bool):
        self.workdir, self.resume = workdir, resume

    def paths(self, seed: int, setting: str) -> tuple[str, str]:
        return (
            os.path.join(self.workdir, "checkpoints", f"seed{seed}", setting),
            os.path.join(self.workdir, "units", f"seed{seed}", f"{setting}.json"),
        )

    def load(self, seed, setting):
        if self.workdir is None or not self.resume:
            return None
        path = self.paths(seed, setting)[1]
        return read_json(path) if os.path.exists(path) else None

    def save(self, seed, setting, rec):
        if self.workdir is not None:
            write_json_atomic(self.paths(seed, setting)[1], rec)

    def checkpointer(self, seed, setting, keep):
        if self.workdir is None:
            return None
        ck = Checkpointer(self.paths(seed, setting)[0], keep_last=keep, keep_best=1)
        if ck.latest_step() is not None and not self.resume:
            raise ValueError(
                f"{ck.directory} already holds checkpoints; pass --resume or use a fresh --workdir"
            )
        return ck


def run_seed(data, seed: int, cfg, units: Units, metrics, log_fn, compiled, rounds) -> dict:
    """Every setting of ``cfg.settings`` for one seed: ``{setting: unit record}``. ``compiled``
    and ``rounds`` (a dict of jitted rounds) are shared by the seeds (one compilation)."""
    algo, mcfg = method_config(cfg)
    sd = build.prepare_seed(data, seed, mcfg)
    spec, scale = sd.encoder.spec, data.rating_scale
    comp = compiled
    tasks_of = sd.train_tasks("resample")
    users = np.unique(np.asarray(tasks_of(1).user)).astype(np.int64)
    parts = partitions(data, users, cfg, seed)
    info = partition_info(parts, users)
    log_fn(
        f"seed {seed}: {users.size} training users; clients iid {info['iid']['clients']} "
        f"(sizes {info['iid']['min']}-{info['iid']['max']}), non-iid "
        f"{info['noniid']['clients']} (sizes {info['noniid']['min']}-{info['noniid']['max']})"
    )
    f = cfg.fed
    local_steps, local_lr = client_settings(f.algorithm, f.local_steps, f.local_lr)
    fed_algo = "reptile" if f.algorithm == "reptile" else algo
    out = {}
    for i, setting in enumerate(cfg.settings):
        done = units.load(seed, setting)
        if done is not None:
            log_fn(f"seed {seed} {setting}: finished earlier, read back")
            out[setting] = done
            continue
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 1000)
        k_init, k_train = jax.random.split(key)  # every setting starts from the same init
        p0 = initial_params(comp.model(spec)[0], k_init, sd, mcfg, seed)
        ck = units.checkpointer(seed, setting, cfg.ckpt_keep)
        unit = f"seed{seed}/{setting}"
        t0 = time.time()
        if SETTINGS[setting] is None:
            eval_fn = comp.eval(spec, algo)
            tr = meta_train(
                comp.learner(spec, algo),
                comp.step(spec, algo),
                eval_fn,
                p0,
                tasks_of,
                sd.val,
                mcfg,
                k_train,
                scale,
                log_fn=log_fn,
                checkpointer=ck,
                resume=units.resume,
                metrics=metrics,
                unit=unit,
            )
            rec = {
                "history": tr.history,
                "best_epoch": tr.best_epoch,
                "steps": tr.steps,
                "tasks_per_epoch": sd.n_task_users,
            }
        else:
            kind, low = SETTINGS[setting]
            learner = comp.learner(spec, fed_algo)
            eval_fn = comp.eval(spec, fed_algo)
            part = parts[kind]
            p = f.low_participation if low else 1.0
            sched = FedSchedule(
                rounds=int(f.rounds_low if low else f.rounds),
                participation=p,
                sampling=f.sampling,
                local_steps=local_steps,
                client_batch=int(f.client_batch),
                eval_every=int(f.eval_every_low if low else f.eval_every),
                patience=int(f.patience),
                drop_prob=f.drop_prob,
                straggler_prob=f.straggler_prob,
                eval_chunk=mcfg.eval_chunk,
                k=mcfg.k,
            )
            opt = server_optimizer(cfg, mcfg)
            meta0 = learner.init(p0)
            n_part = len(part)
            dp = dp_setting(f, p, n_part, sched.rounds)
            key_r = (spec, fed_algo, p, n_part, repr(cfg.fed.to_dict()))
            if key_r not in rounds:
                rounds[key_r] = make_round(
                    learner,
                    opt,
                    local_lr=local_lr,
                    clip_norm=mcfg.clip_norm or None,
                    dp_clip=f.dp_clip or None,
                    dp_noise=dp.get("noise_multiplier", 0.0),
                    expected_clients=p * n_part if f.dp_clip else None,
                )
            round_fn = rounds[key_r]
            tr = federated_train(
                round_fn,
                eval_fn,
                meta0,
                opt.init(meta0),
                tasks_of,
                part,
                sd.val,
                sched,
                k_train,
                scale,
                log_fn=log_fn,
                checkpointer=ck,
                resume=units.resume,
                metrics=metrics,
                unit=unit,
            )
            rec = {
                "history": tr.history,
                "best_round": tr.best_round,
                "rounds": tr.rounds,
                "bytes_down": tr.bytes_down,
                "bytes_up": tr.bytes_up,
                "message_bytes": tr.message_bytes,
                "participation": p,
                "clients": len(part),
                "dp": dp_report(dp, tr.rounds),
            }
        if ck is not None:
            ck.close()
        scores, per_user = {}, {}
        for s, t in sd.test.items():
            pred = predict_tasks(eval_fn, tr.params, t, mcfg.eval_chunk)["pred"]
            scores[s], per_user[s] = evaluate(pred, t, scale, mcfg.k)
        rec |= {
            "scores": scores,
            "best_val_mae": tr.best_val_mae,
            "seconds": tr.seconds,
            "wall_s": time.time() - t0,
            "params_sha256": tr.params_sha256,
            "partition": info,
        }
        log_fn(
            f"seed {seed} {setting}: val MAE {tr.best_val_mae:.4f}, {tr.seconds:.1f}s"
            + (f" ({i + 1}/{len(cfg.settings)})")
        )
        rec = {"seed": seed, "unit": setting} | rec
        units.save(seed, setting, rec)
        out[setting] = rec
    return out


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def run(cfg, workdir: str | None = None, *, resume=False, argv=None, log_fn=print) -> dict:
    """All seeds and settings; returns the ``results.json`` dict."""
    validate_config(cfg)
    data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None)
    sha = mdata.data_checksum(data)
    meta, changed = {}, []
    metrics = None
    if workdir is not None:
        meta, changed = open_run(
            workdir,
            cfg.to_dict(),
            resume=resume,
            mutable=RESUME_MUTABLE,
            data_sha256=sha,
            state=("checkpoints", "units"),
            argv=argv,
            log_fn=log_fn,
        )
        metrics = MetricsWriter(workdir, tensorboard=False)
    units = Units(workdir, resume)
    algo, mcfg = method_config(cfg)
    compiled = build.Compiled(mcfg)
    rounds: dict = {}
    per_seed = {}
    t0 = time.time()
    try:
        for seed in cfg.seeds:
            log_fn(f"=== seed {seed}")
            per_seed[seed] = run_seed(data, seed, cfg, units, metrics, log_fn, compiled, rounds)
    finally:
        if metrics is not None:
            metrics.close()
    results = {
        s: {
            setting: {
                m: mmetrics.mean_std_over_seeds(
                    [per_seed[seed][setting]["scores"][s][m] for seed in cfg.seeds]
                )
                for m in TABLE_METRICS
            }
            for setting in cfg.settings
        }
        for s in TEST_SCENARIOS
    }
    validation = {
        setting: mmetrics.mean_std_over_seeds(
            [per_seed[seed][setting]["best_val_mae"] for seed in cfg.seeds]
        )
        for setting in cfg.settings
    }
    out = {
        "dataset": cfg.dataset,
        "protocol": mcfg.protocol,
        "seeds": list(cfg.seeds),
        "method": cfg.method,
        "learner": algo,
        "config": cfg.to_dict(),
        "method_config": mcfg.to_dict(),
        "results": results,
        "validation_mae": validation,
        "per_seed": {str(seed): r for seed, r in per_seed.items()},
        "data_sha256": sha,
        "wall_s": round(time.time() - t0, 1),
        "command": meta.get("command"),
        "resumed_with_changes": changed,
    }
    if "central" in cfg.settings:
        out["gap_to_central"] = gaps(out)
    return out


def gaps(res: dict) -> dict:
    """Relative MAE gap of every federated setting to ``central`` per scenario (mean over seeds of
    the MAE, then (fed - central) / central)."""
    out = {}
    for s, per in res["results"].items():
        c = per["central"]["mae"]["mean"]
        out[s] = {k: (v["mae"]["mean"] - c) / c for k, v in per.items() if k != "central"}
    return out


def format_table(res: dict) -> str:
    seeds = res["seeds"]
    cfg = res["config"]
    f = cfg["fed"]
    lines = [
        f"{res['dataset']} / seeds {seeds} / method {res['method']} (private variant: no MF "
        f"tables, no kNN; {res['learner']}) / federated: {f['algorithm']}, {f['n_clients']} IID "
        f"clients, non-IID by {','.join(f['noniid_by'])}, server {f['server_optimizer']} "
        f"lr {f['server_lr'] or res['method_config']['meta_lr']}",
        "mean ± sample std over seeds; gap = relative MAE difference to central",
    ]
    header = f"{'scenario':16s} {'setting':15s}" + "".join(f"{m:>18s}" for m in TABLE_METRICS)
    header += f"{'gap':>9s}"
    lines += [header, "-" * len(header)]
    for s in TEST_SCENARIOS:
        for setting, vals in res["results"][s].items():
            cells = [format_mean_std(vals[m], len(seeds)) for m in TABLE_METRICS]
            gap = res.get("gap_to_central", {}).get(s, {}).get(setting)
            g = "" if gap is None else f"{100 * gap:+8.2f}%"
            lines.append(
                f"{s:16s} {setting:15s}" + "".join(f"{c:>18s}" for c in cells) + f"{g:>9s}"
            )
        lines.append("")
    lines.append(
        "validation MAE (best, the selection set): "
        + ", ".join(f"{k} {v['mean']:.4f}" for k, v in res["validation_mae"].items())
    )
    comm = []
    for setting in res["results"]["user_cold"]:
        recs = [res["per_seed"][str(seed)][setting] for seed in seeds]
        if "bytes_up" in recs[0]:
            mb = np.mean([r["bytes_up"] + r["bytes_down"] for r in recs]) / 1e6
            best = np.mean([r["best_round"] for r in recs])
            comm.append(
                f"{setting} {mb:.0f} MB over {recs[0]['rounds']} rounds (best round {best:.0f})"
            )
    if comm:
        lines.append("communication (down + up, float32): " + "; ".join(comm))
    return "\n".join(lines)


def figures(res: dict, workdir: str) -> list[str]:
    """Validation MAE vs rounds and vs cumulative bytes per federated setting (mean over seeds),
    the centralised best validation MAE as a reference line."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(workdir, "report"), exist_ok=True)
    seeds = [str(s) for s in res["seeds"]]
    paths = []
    for name, xkey, xlabel in (
        ("federated_rounds.png", "round", "communication round"),
        ("federated_bytes.png", "bytes", "cumulative bytes sent (down + up, float32)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for setting in res["results"]["user_cold"]:
            recs = [res["per_seed"][s][setting] for s in seeds]
            if setting == "central":
                ax.axhline(
                    np.mean([r["best_val_mae"] for r in recs]),
                    ls="--",
                    c="k",
                    label="central (best)",
                )
                continue
            n = min(len(r["history"]) for r in recs)
            y = np.mean([[h["val_mae"] for h in r["history"][:n]] for r in recs], axis=0)
            if xkey == "round":
                x = [h["round"] for h in recs[0]["history"][:n]]
            else:
                x = np.mean(
                    [[h["bytes_down"] + h["bytes_up"] for h in r["history"][:n]] for r in recs], 0
                )
            ax.plot(x, y, label=setting)
        if xkey == "bytes":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation MAE (mean over seeds)")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(workdir, "report", name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> dict:
    """The script body: run, write results.json / results.md / figures, print the table."""
    validate_config(cfg)
    enable_compilation_cache()
    prepare_workdir(workdir, "federated", RUN_FILES, overwrite=overwrite)
    with train_log(workdir, resume) as log_fn:
        res = run(cfg, workdir, resume=resume, argv=argv, log_fn=log_fn)
    write_results(workdir, res, format_table(res))
    if cfg.report:
        for p in figures(res, workdir):
            print(f"figure: {p}")
    return res
