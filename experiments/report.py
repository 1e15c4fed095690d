"""Turn a run's results into a Markdown report with tables and PNG figures.

  python -m experiments.report --workdir=runs/demo        # -> runs/demo/report/report.md

Reads ``results.json`` (``experiments/meta_train.py``; format in PROTOCOL.md) and, when present,
``rl_results.json`` (``{"results": {method: {"ctr": {n_episodes: {"mean", "std"}}, ...}}}``) from
--workdir, and writes into ``<workdir>/report/``:

* ``report.md`` — per-scenario tables (mean ± sample std over seeds), scenario sizes, adaptation
  tables, the RL table, and provenance (command, config, package versions, data checksum);
* ``training_curves.png`` — validation MAE and training loss per epoch, per algorithm and seed;
* ``adaptation_steps.png`` / ``adaptation_support.png`` — test MAE vs inner steps and vs support-set
  size per scenario (``results.json["adaptation"]``);
* ``scenario_bars.png`` — per-scenario comparison of every method (MAE, RMSE, nDCG@3);
* ``rl_ctr.png`` — CTR vs number of adaptation episodes per method (from ``rl_results.json``).

Everything is drawn with matplotlib's Agg backend (no display needed). The functions here are
importable (``make_report``); ``main`` only parses the flag.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

SCENARIOS = ("warm_test", "user_cold", "item_cold", "user_item_cold")
METRICS = ("mae", "rmse", "ndcg@3")
LOWER_IS_BETTER = {"mae": True, "rmse": True, "ndcg@3": False}


def _load(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; {what}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None


def _fmt(v: dict | None, digits: int = 4) -> str:
    if not v:
        return ""
    return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"


def _sorted_num(keys) -> list[str]:
    return sorted(keys, key=lambda k: float(k))


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def results_table(res: dict, scenario: str, metrics=METRICS) -> str:
    """Markdown table of one scenario: method x metric, mean ± std, best value per metric in bold."""
    methods = res["results"].get(scenario, {})
    best = {}
    for m in metrics:
        vals = [(v[m]["mean"], name) for name, v in methods.items() if m in v and name != "random"]
        if vals:
            best[m] = (min if LOWER_IS_BETTER.get(m, True) else max)(vals)[1]
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, vals in methods.items():
        cells = []
        for m in metrics:
            c = _fmt(vals.get(m))
            cells.append(f"**{c}**" if best.get(m) == name and c else c)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------

def _save(fig, path: str) -> str:
    """Lay out, write ``path`` (PNG, 100 dpi) and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training(res: dict, path: str) -> str | None:
    """Validation MAE and training loss per epoch for every algorithm and seed."""
    training = res.get("training") or {}
    algos = sorted({a for info in training.values() for a in (info.get("histories") or {})})
    if not algos:
        return None
    fig, axes = plt.subplots(2, len(algos), figsize=(4 * len(algos), 6), squeeze=False)
    for j, algo in enumerate(algos):
        for seed, info in sorted(training.items()):
            hist = (info.get("histories") or {}).get(algo)
            if not hist:
                continue
            ep = [h["epoch"] for h in hist]
            axes[0, j].plot(ep, [h["val_mae"] for h in hist], marker=".", label=f"seed {seed}")
            axes[1, j].plot(ep, [h["train_loss"] for h in hist], marker=".", label=f"seed {seed}")
            best = (info.get("best_epoch") or {}).get(algo)
            if best:
                axes[0, j].axvline(best, color=axes[0, j].lines[-1].get_color(), ls=":", lw=1)
        axes[0, j].set_title(algo)
        axes[0, j].set_ylabel("validation MAE")
        axes[1, j].set_ylabel("training loss (query MSE)")
        axes[1, j].set_xlabel("epoch")
        axes[0, j].legend(fontsize=7)
    fig.suptitle("Meta-training (dotted: best epoch, kept by early stopping)")
    return _save(fig, path)


def plot_adaptation(adapt: dict, kind: str, path: str) -> str | None:
    """Test MAE (mean ± std over seeds) vs inner steps (``kind="steps"``) or support size
    (``kind="support"``), one line per scenario."""
    curves = adapt.get(kind) or {}
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in SCENARIOS:
        pts = curves.get(s) or {}
        if not pts:
            continue
        xs = _sorted_num(pts)
        val = [pts[x]["mae"] if kind == "support" else pts[x] for x in xs]
        ax.errorbar([float(x) for x in xs], [v["mean"] for v in val], yerr=[v["std"] for v in val],
                    marker="o", capsize=3, label=s)  # fmt: skip
    ax.set_xlabel("inner gradient steps at test time" if kind == "steps" else "support-set size (ratings)")
    ax.set_ylabel("test MAE")
    if kind == "support":
        ax.set_xscale("log")
    ax.set_title(f"{adapt.get('algo', '')}: MAE vs {'inner steps' if kind == 'steps' else 'support size'}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_scenario_bars(res: dict, path: str, metrics=METRICS) -> str | None:
    """Grouped bars: one group per scenario, one bar per method, error bars = std over seeds."""
    scen = [s for s in SCENARIOS if res["results"].get(s)]
    if not scen:
        return None
    methods = [m for m in res["results"][scen[0]] if m != "random"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for j, metric in enumerate(metrics):
        ax = axes[0, j]
        for i, m in enumerate(methods):
            vals = [res["results"][s].get(m, {}).get(metric) for s in scen]
            ax.bar(np.arange(len(scen)) + i * width, [v["mean"] if v else np.nan for v in vals], width,
                   yerr=[v["std"] if v else 0 for v in vals], capsize=2, label=m)  # fmt: skip
        if metric.startswith("ndcg"):
            rnd = [res["results"][s].get("random", {}).get(metric) for s in scen]
            for k, v in enumerate(rnd):
                if v:
                    ax.hlines(v["mean"], k - width / 2, k + 0.8 - width / 2, colors="k", linestyles=":")
        ax.set_xticks(np.arange(len(scen)) + 0.4 - width / 2)
        ax.set_xticklabels(scen, rotation=15, fontsize=8)
        ax.set_title(metric + (" (dotted: random ranking)" if metric.startswith("ndcg") else ""))
        finite = [v[metric]["mean"] for s in scen for v in res["results"][s].values() if metric in v]
        if finite and metric in ("mae", "rmse"):
            ax.set_ylim(0.8 * min(finite), 1.05 * max(finite))
    axes[0, 0].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_rl(rl: dict, path: str) -> str | None:
    """CTR (mean ± std) vs number of adaptation episodes, one line per method."""
    methods = rl.get("results") or {}
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, vals in methods.items():
        ctr = vals.get("ctr") or {}
        if not ctr:
            continue
        xs = _sorted_num(ctr)
        mean = np.array([ctr[x]["mean"] for x in xs])
        std = np.array([ctr[x].get("std", 0.0) for x in xs])
        x = np.array([float(v) for v in xs])
        ax.plot(x, mean, marker="o", label=m)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("adaptation episodes")
    ax.set_ylabel("CTR")
    ax.set_title("Meta-RL: CTR vs adaptation episodes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def make_report(workdir: str, out_dir: str | None = None) -> str:
    """Write ``report.md`` and its figures for the run in ``workdir``; returns the report's path.
    Needs ``results.json`` or ``rl_results.json`` (or both) in ``workdir``."""
    res_path, rl_path = os.path.join(workdir, "results.json"), os.path.join(workdir, "rl_results.json")
    if not os.path.exists(res_path) and not os.path.exists(rl_path):
        raise FileNotFoundError(
            f"{workdir}: neither results.json nor rl_results.json found; run experiments/meta_train.py "
            f"--workdir={workdir} first (or point --workdir at a finished run)"
        )
    out_dir = out_dir or os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    md: list[str] = []
    figs: dict[str, str | None] = {}
    if os.path.exists(res_path):
        res = _load(res_path, "")
        cfg = res.get("config", {})
        md += [f"# Cold-start meta-learning: {res.get('dataset', '?')} / protocol {res.get('protocol', '?')}", ""]
        md += [f"Seeds {res.get('seeds')}; metrics per user on the 10 query ratings after adapting on the support set "
               f"({cfg.get('adapt', '?')} parameters, {cfg.get('inner_steps', '?')} steps, lr {cfg.get('inner_lr', '?')}),"
               " averaged over users; mean ± sample std over seeds. Bold: best per column.", ""]  # fmt: skip
        scen = res.get("scenarios", {})
        md += ["## Scenarios", "", "| scenario | users |", "|---|---:|"]
        md += [f"| {s} | {v.get('n_users', '')} |" for s, v in scen.items()] + [""]
        md += ["## Results", ""]
        for s in SCENARIOS:
            if res.get("results", {}).get(s):
                md += [f"### {s} ({scen.get(s, {}).get('n_users', '?')} users)", "", results_table(res, s), ""]
        figs["scenario_bars"] = plot_scenario_bars(res, os.path.join(out_dir, "scenario_bars.png"))
        if figs["scenario_bars"]:
            md += ["![per-scenario comparison](scenario_bars.png)", ""]
        figs["training"] = plot_training(res, os.path.join(out_dir, "training_curves.png"))
        if figs["training"]:
            md += ["## Meta-training", "", "![training curves](training_curves.png)", ""]
            rows = []
            for seed, info in sorted(res.get("training", {}).items()):
                for algo, hist in (info.get("histories") or {}).items():
                    rows.append(f"| {seed} | {algo} | {(info.get('best_epoch') or {}).get(algo, '')} | "
                                f"{min(h['val_mae'] for h in hist):.4f} | {len(hist)} | "
                                f"{(info.get('seconds') or {}).get(algo, float('nan')):.1f} |")  # fmt: skip
            md += ["| seed | algorithm | best epoch | best val MAE | epochs run | seconds |", "|---|---|---:|---:|---:|---:|"]
            md += rows + [""]
        adapt = res.get("adaptation")
        if adapt:
            md += ["## Adaptation", "", f"Trained meta-parameters of **{adapt.get('algo')}** re-evaluated on the test "
                   "scenarios with a different number of inner steps (0 = the initialisation) and with each user's "
                   "support set cut to its first n ratings (users with fewer are left out; users counted per point).", ""]  # fmt: skip
            for kind, title in (("steps", "inner steps"), ("support", "support size")):
                figs[kind] = plot_adaptation(adapt, kind, os.path.join(out_dir, f"adaptation_{kind}.png"))
                if not figs[kind]:
                    continue
                md += [f"![MAE vs {title}](adaptation_{kind}.png)", ""]
                xs = sorted({x for s in SCENARIOS for x in (adapt[kind].get(s) or {})}, key=float)
                md += [f"| scenario | " + " | ".join(f"{title} {x}" for x in xs) + " |", "|---|" + "---:|" * len(xs)]
                for s in SCENARIOS:
                    pts = adapt[kind].get(s) or {}
                    cells = []
                    for x in xs:
                        p = pts.get(x)
                        if p is None:
                            cells.append("")
                        elif kind == "support":
                            cells.append(f"{_fmt(p['mae'])} (n={p['n_users']:g})")
                        else:
                            cells.append(_fmt(p))
                    md.append(f"| {s} | " + " | ".join(cells) + " |")
                md.append("")
    if os.path.exists(rl_path):
        rl = _load(rl_path, "")
        figs["rl"] = plot_rl(rl, os.path.join(out_dir, "rl_ctr.png"))
        md += ["## Meta-RL", ""]
        if figs["rl"]:
            md += ["![CTR vs adaptation episodes](rl_ctr.png)", ""]
        eps = sorted({e for v in rl.get("results", {}).values() for e in (v.get("ctr") or {})}, key=float)
        md += ["| method | " + " | ".join(f"CTR after {e} ep." for e in eps) + " |", "|---|" + "---:|" * len(eps)]
        for m, v in rl.get("results", {}).items():
            md.append(f"| {m} | " + " | ".join(_fmt((v.get("ctr") or {}).get(e)) for e in eps) + " |")
        md.append("")
    if os.path.exists(res_path):
        md += ["## Provenance", ""]
        data = res.get("data", {})
        run = res.get("run", {})
        md += [_kv_table([
            ("command", f"`{res.get('command', '?')}`"), ("data", f"{data.get('source', '?')} ({data.get('format', '?')})"),
            ("data sha256", f"`{data.get('sha256', '?')}`"), ("git commit", f"`{run.get('git_commit')}`"),
            ("devices", ", ".join(run.get("devices", []))), ("started (UTC)", run.get("started_utc", "?")),
            ("versions", ", ".join(f"{k} {v}" for k, v in (res.get("versions") or {}).items())),
        ]), ""]  # fmt: skip
        if data.get("cleaning"):
            md += ["Cleaning: " + ", ".join(f"{k} {v}" for k, v in data["cleaning"].items()), ""]
        md += ["<details><summary>config</summary>", "", "```json", json.dumps(res.get("config", {}), indent=1), "```",
               "", "</details>", ""]  # fmt: skip
    path = os.path.join(out_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(md))
    os.replace(path + ".tmp", path)
    return path


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script, so that experiments/meta_train.py
    can import :func:`make_report` without a clash over --workdir)."""
    flags.DEFINE_string("workdir", None, "Run folder holding results.json and/or rl_results.json.")
    flags.DEFINE_string("out_dir", None, "Where to write the report (default <workdir>/report).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (the folder of a meta_train run)")
    try:
        path = make_report(FLAGS.workdir, FLAGS.out_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
