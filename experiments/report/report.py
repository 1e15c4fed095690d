"""Turn a run's results into a Markdown report with tables and PNG figures.

Reads ``results.json`` (the cold-start pipeline's; format in PROTOCOL.md) and, when present,
``rl_results.json`` (``{"results": {method: {"ctr": {n_episodes: {"mean", "std"}}, ...}}}``) from
a run folder, and writes into ``<workdir>/report/``:

* ``report.md`` — per-scenario tables (mean ± sample std over seeds; the mean alone for one seed),
  scenario sizes, adaptation tables, the RL table, and provenance (command, config, package
  versions, data checksum);
* ``training_curves.png`` — validation MAE and training loss per epoch, per algorithm and seed;
* ``adaptation_steps.png`` / ``adaptation_support.png`` — test MAE vs inner steps and vs support-set
  size per scenario (``results.json["adaptation"]``);
* ``scenario_bars.png`` — per-scenario comparison of every method (MAE, RMSE, nDCG@3);
* ``rl_ctr.png`` / ``rl_regret.png`` — CTR (with the oracle's) and cumulative regret against the
  oracle vs number of adaptation episodes per method (from ``rl_results.json``).

Everything is drawn with matplotlib's Agg backend (no display needed). ``main.py`` is the command
line; pipelines call :func:`make_report`.
"""

from __future__ import annotations

import json
import os

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.coldstart.paired import paired_rows  # noqa: E402
from experiments.common import format_mean_std  # noqa: E402

SCENARIOS = ("warm_test", "user_cold", "item_cold", "user_item_cold")
METRICS = ("mae", "rmse", "ndcg@3")
LOWER_IS_BETTER = {"mae": True, "rmse": True, "ndcg@3": False}
# a results file that does not list its seeds: show the spread it holds
SEEDS_UNKNOWN = 2


def _load(path: str) -> dict:
    """A JSON file; ``ValueError`` naming the file, line and column where it is not JSON."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            where = f"{path}, line {e.lineno}, column {e.colno}"
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None


def n_seeds(doc: dict) -> int:
    """How many seeds a results file's means are over (:data:`SEEDS_UNKNOWN` if it does not say)."""
    seeds = doc.get("seeds")
    return len(seeds) if isinstance(seeds, list) else SEEDS_UNKNOWN


def _fmt(v: dict | None, seeds: int) -> str:
    """``"0.8100 ± 0.0100"``; the mean alone for one seed; ``""`` for no value."""
    return format_mean_std(v, seeds).strip() if v else ""


def _sorted_num(keys) -> list[str]:
    return sorted(keys, key=lambda k: float(k))


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def results_table(res: dict, scenario: str, metrics=METRICS) -> str:
    """Markdown table of one scenario: method x metric, mean ± std, the best per metric in bold."""
    methods = res["results"].get(scenario, {})
    seeds = n_seeds(res)
    best = {}
    for m in metrics:
        vals = [(v[m]["mean"], name) for name, v in methods.items() if m in v and name != "random"]
        if vals:
            best[m] = (min if LOWER_IS_BETTER.get(m, True) else max)(vals)[1]
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, vals in methods.items():
        cells = []
        for m in metrics:
            c = _fmt(vals.get(m), seeds)
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
        ax.errorbar(
            [float(x) for x in xs],
            [v["mean"] for v in val],
            yerr=[v["std"] for v in val],
            marker="o",
            capsize=3,
            label=s,
        )
    steps = kind == "steps"
    ax.set_xlabel("inner gradient steps at test time" if steps else "support-set size (ratings)")
    ax.set_ylabel("test MAE")
    if kind == "support":
        ax.set_xscale("log")
    ax.set_title(f"{adapt.get('algo', '')}: MAE vs {'inner steps' if steps else 'support size'}")
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
            ax.bar(
                np.arange(len(scen)) + i * width,
                [v["mean"] if v else np.nan for v in vals],
                width,
                yerr=[v["std"] if v else 0 for v in vals],
                capsize=2,
                label=m,
            )
        if metric.startswith("ndcg"):
            rnd = [res["results"][s].get("random", {}).get(metric) for s in scen]
            for k, v in enumerate(rnd):
                if v:
                    lo, hi = k - width / 2, k + 0.8 - width / 2
                    ax.hlines(v["mean"], lo, hi, colors="k", linestyles=":")
        ax.set_xticks(np.arange(len(scen)) + 0.4 - width / 2)
        ax.set_xticklabels(scen, rotation=15, fontsize=8)
        ax.set_title(metric + (" (dotted: random ranking)" if metric.startswith("ndcg") else ""))
        finite = [
            v[metric]["mean"] for s in scen for v in res["results"][s].values() if metric in v
        ]
        if finite and metric in ("mae", "rmse"):
            ax.set_ylim(0.8 * min(finite), 1.05 * max(finite))
    axes[0, 0].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_rl(rl: dict, path: str, metric: str = "ctr") -> str | None:
    """``metric`` (mean ± std over seeds) vs number of adaptation episodes, one line per method;
    the oracle's CTR as a dashed line on the CTR figure."""
    methods = rl.get("results") or {}
    if not any((v.get(metric) or {}) for v in methods.values()):
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(methods), 2)))  # distinct for > 10 methods
    for colour, (m, vals) in zip(colours, methods.items()):
        cur = vals.get(metric) or {}
        if not cur:
            continue
        xs = _sorted_num(cur)
        mean = np.array([cur[x]["mean"] for x in xs])
        std = np.array([cur[x].get("std", 0.0) for x in xs])
        x = np.array([float(v) for v in xs])
        lw = 2.5 if m == rl.get("recommended") else 1.2
        ax.plot(x, mean, marker="o", label=m, color=colour, lw=lw)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=colour)
    if metric == "ctr" and rl.get("oracle_ctr"):
        ax.axhline(rl["oracle_ctr"]["mean"], color="k", ls="--", lw=1, label="oracle")
    labels = {
        "ctr": "CTR",
        "cum_regret": "cumulative regret vs the oracle",
        "ndcg": "slate nDCG",
    }
    ax.set_xlabel("adaptation episodes")
    ax.set_ylabel(labels.get(metric, metric))
    ax.set_title(f"Meta-RL: {labels.get(metric, metric)} vs adaptation episodes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def _coldstart_sections(res: dict, out_dir: str) -> list[str]:
    """Header, scenario sizes, per-scenario tables, training and adaptation of ``results.json``."""
    cfg = res.get("config", {})
    seeds = n_seeds(res)
    spread = "mean ± sample std over seeds" if seeds > 1 else "one seed, so no spread"
    title = f"{res.get('dataset', '?')} / protocol {res.get('protocol', '?')}"
    md = [f"# Cold-start meta-learning: {title}", ""]
    md += [
        f"Seeds {res.get('seeds')}; metrics per user on the 10 query ratings after adapting on the "
        f"support set ({cfg.get('adapt', '?')} parameters, {cfg.get('inner_steps', '?')} steps, "
        f"lr {cfg.get('inner_lr', '?')}), averaged over users; {spread}. Bold: best per column.",
        "",
    ]
    scen = res.get("scenarios", {})
    md += ["## Scenarios", "", "| scenario | users |", "|---|---:|"]
    md += [f"| {s} | {v.get('n_users', '')} |" for s, v in scen.items()] + [""]
    md += ["## Results", ""]
    for s in SCENARIOS:
        if res.get("results", {}).get(s):
            n_users = scen.get(s, {}).get("n_users", "?")
            md += [f"### {s} ({n_users} users)", "", results_table(res, s), ""]
    if res.get("paired"):
        md += _paired_section(res["paired"])
    if plot_scenario_bars(res, os.path.join(out_dir, "scenario_bars.png")):
        md += ["![per-scenario comparison](scenario_bars.png)", ""]
    if plot_training(res, os.path.join(out_dir, "training_curves.png")):
        md += ["## Meta-training", "", "![training curves](training_curves.png)", ""]
        md += [
            "| seed | algorithm | best epoch | best val MAE | epochs run | seconds |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for seed, info in sorted(res.get("training", {}).items()):
            for algo, hist in (info.get("histories") or {}).items():
                best = (info.get("best_epoch") or {}).get(algo, "")
                best_mae = min(h["val_mae"] for h in hist)
                seconds = (info.get("seconds") or {}).get(algo, float("nan"))
                cells = f"{best} | {best_mae:.4f} | {len(hist)} | {seconds:.1f}"
                md.append(f"| {seed} | {algo} | {cells} |")
        md.append("")
    if res.get("adaptation"):
        md += _adaptation_section(res["adaptation"], out_dir)
    return md


def _paired_section(paired: dict) -> list[str]:
    """The recommended method against the best baseline per scenario and metric."""
    md = [
        "## Paired comparison with the best baseline",
        "",
        "Per-user differences (recommended method minus the scenario's best non-meta baseline by "
        "mean), users pooled over seeds; 95% paired-bootstrap interval; Wilcoxon signed-rank p. "
        "Lower MAE and higher nDCG are better.",
        "",
        "| scenario | metric | method | baseline | users | method mean | baseline mean | "
        "difference [95% CI] | p |",
        "|---|---|---|---|---:|---:|---:|---|---:|",
    ]
    for s, metric, c in paired_rows(paired):
        lo, hi = c["ci95"]
        md.append(
            f"| {s} | {metric} | {c['method']} | {c['baseline']} | {c['n']} | "
            f"{c['mean_a']:.4f} | {c['mean_b']:.4f} | {c['mean_diff']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] | {c['wilcoxon_p']:.2g} |"
        )
    return md + [""]


def _adaptation_section(adapt: dict, out_dir: str) -> list[str]:
    """MAE vs inner steps and vs support size of the re-evaluated meta-parameters."""
    seeds = adapt.get("n_seeds", SEEDS_UNKNOWN)
    md = [
        "## Adaptation",
        "",
        f"Trained meta-parameters of **{adapt.get('algo')}** re-evaluated on the test scenarios "
        "with a different number of inner steps (0 = the initialisation) and with each user's "
        "support set cut to its first n ratings (users with fewer are left out; users counted per "
        "point).",
        "",
    ]
    for kind, title in (("steps", "inner steps"), ("support", "support size")):
        if not plot_adaptation(adapt, kind, os.path.join(out_dir, f"adaptation_{kind}.png")):
            continue
        md += [f"![MAE vs {title}](adaptation_{kind}.png)", ""]
        xs = sorted({x for s in SCENARIOS for x in (adapt[kind].get(s) or {})}, key=float)
        md += ["| scenario | " + " | ".join(f"{title} {x}" for x in xs) + " |"]
        md += ["|---|" + "---:|" * len(xs)]
        for s in SCENARIOS:
            pts = adapt[kind].get(s) or {}
            cells = []
            for x in xs:
                p = pts.get(x)
                if p is None:
                    cells.append("")
                elif kind == "support":
                    cells.append(f"{_fmt(p['mae'], seeds)} (n={p['n_users']:g})")
                else:
                    cells.append(_fmt(p, seeds))
            md.append(f"| {s} | " + " | ".join(cells) + " |")
        md.append("")
    return md


def _rl_section(rl: dict, out_dir: str) -> list[str]:
    """The CTR and cumulative-regret figures and tables of ``rl_results.json``."""
    md = ["## Meta-RL", ""]
    if plot_rl(rl, os.path.join(out_dir, "rl_ctr.png")):
        md += ["![CTR vs adaptation episodes](rl_ctr.png)", ""]
    if plot_rl(rl, os.path.join(out_dir, "rl_regret.png"), "cum_regret"):
        md += ["![cumulative regret vs adaptation episodes](rl_regret.png)", ""]
    results = rl.get("results", {})
    slates = any("ndcg" in v for v in results.values())
    if slates and plot_rl(rl, os.path.join(out_dir, "rl_ndcg.png"), "ndcg"):
        md += ["![slate nDCG vs adaptation episodes](rl_ndcg.png)", ""]
    seeds = n_seeds(rl)
    tables = (("ctr", "CTR"), ("cum_regret", "cumulative regret"), ("ndcg", "slate nDCG"))
    for metric, name in tables:
        eps = sorted({e for v in results.values() for e in (v.get(metric) or {})}, key=float)
        if not eps:
            continue
        md += ["| method | " + " | ".join(f"{name} after {e} ep." for e in eps) + " |"]
        md += ["|---|" + "---:|" * len(eps)]
        for m, v in results.items():
            cur = v.get(metric) or {}
            md.append(f"| {m} | " + " | ".join(_fmt(cur.get(e), seeds) for e in eps) + " |")
        if metric == "ctr" and rl.get("oracle_ctr"):
            md.append(f"| oracle | {_fmt(rl['oracle_ctr'], seeds)} |" + " |" * (len(eps) - 1))
        md.append("")
    return md


def _provenance_section(res: dict) -> list[str]:
    """Command, data, commit, devices, versions, cleaning counts and config of ``results.json``."""
    data = res.get("data", {})
    run = res.get("run", {})
    versions = ", ".join(f"{k} {v}" for k, v in (res.get("versions") or {}).items())
    rows = [
        ("command", f"`{res.get('command', '?')}`"),
        ("data", f"{data.get('source', '?')} ({data.get('format', '?')})"),
        ("data sha256", f"`{data.get('sha256', '?')}`"),
        ("git commit", f"`{run.get('git_commit')}`"),
        ("devices", ", ".join(run.get("devices", []))),
        ("started (UTC)", run.get("started_utc", "?")),
        ("versions", versions),
    ]
    md = ["## Provenance", "", _kv_table(rows), ""]
    if data.get("cleaning"):
        md += ["Cleaning: " + ", ".join(f"{k} {v}" for k, v in data["cleaning"].items()), ""]
    md += ["<details><summary>config</summary>", "", "```json"]
    md += [json.dumps(res.get("config", {}), indent=1), "```", "", "</details>", ""]
    return md


def make_report(workdir: str, out_dir: str | None = None) -> str:
    """Write ``report.md`` and its figures for the run in ``workdir``; returns the report's path.
    Needs ``results.json`` or ``rl_results.json`` (or both) in ``workdir``."""
    res_path = os.path.join(workdir, "results.json")
    rl_path = os.path.join(workdir, "rl_results.json")
    if not os.path.exists(res_path) and not os.path.exists(rl_path):
        raise FileNotFoundError(
            f"{workdir}: neither results.json nor rl_results.json found; run an experiment with "
            f"--workdir={workdir} first (or point --workdir at a finished run)"
        )
    out_dir = out_dir or os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    md: list[str] = []
    res = _load(res_path) if os.path.exists(res_path) else None
    if res is not None:
        md += _coldstart_sections(res, out_dir)
    if os.path.exists(rl_path):
        md += _rl_section(_load(rl_path), out_dir)
    if res is not None:
        md += _provenance_section(res)
    path = os.path.join(out_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(md))
    os.replace(path + ".tmp", path)
    return path
