"""The private experiment's tables and figure, from its ``results.json`` payload."""

from __future__ import annotations

import os

import numpy as np

from experiments.common import format_mean_std
from metarec.data import SCENARIOS

TABLE_METRICS = ("mae", "rmse", "ndcg@3")


def format_table(res: dict) -> str:
    """The privacy table and the utility table (mean ± sample std over seeds)."""
    n_seeds = len(res["seeds"])
    lines = [
        f"{res['dataset']} / {res['method']} private variant / seeds {res['seeds']} / "
        f"{res['guarantee']}",
        f"selection: l2_clip {res['selection']['l2_clip']:g}, meta_lr "
        f"{res['selection']['meta_lr']:g}, expected batch {res['selection']['expected_batch']}, "
        f"{res['selection']['steps']} steps ({res['selection']['how']})",
        "",
        f"{'eps target':>10} {'eps achieved':>13} {'sigma':>7} {'q':>7} {'steps':>6} "
        f"{'delta':>9} {'clipped':>8} {'trunc':>5}",
    ]
    for row in res["privacy"]:
        achieved = [e for e in row["epsilon_achieved"] if e != "inf"]
        ach = f"{max(achieved):.3f}" if achieved else "inf"
        lines.append(
            f"{row['label']:>10} {ach:>13} {np.mean(row['sigma']):7.3f} "
            f"{np.mean(row['q']):7.4f} {row['steps']:6d} {np.mean(row['delta']):9.2e} "
            f"{np.mean(row['mean_clipped']):8.2f} {row['truncated']:5d}"
        )
    lines.append("")
    for metric in TABLE_METRICS:
        head = f"{metric:<8}{'epsilon':>8}" + "".join(
            f"{s + ' (' + str(res['scenarios'][s]['n_users']) + ')':>22}" for s in SCENARIOS
        )
        lines += [head, "-" * len(head)]
        for row in res["privacy"]:
            lab = row["label"]
            cells = (format_mean_std(res["results"][s][lab][metric], n_seeds) for s in SCENARIOS)
            lines.append(f"{'':<8}{lab:>8}" + "".join(f"{c:>22}" for c in cells))
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    """MAE and nDCG@3 per scenario vs epsilon (log x); epsilon = inf as a dashed line."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("mae", "ndcg@3")):
        for i, s in enumerate(SCENARIOS):
            color = f"C{i}"
            labs = [r["label"] for r in res["privacy"]]
            finite = [lab for lab in labs if lab != "inf"]
            xs = [float(lab) for lab in finite]
            ys = [res["results"][s][lab][metric]["mean"] for lab in finite]
            es = [res["results"][s][lab][metric]["std"] for lab in finite]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=color, label=s)
            if "inf" in labs:
                ax.axhline(res["results"][s]["inf"][metric]["mean"], color=color, ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel("epsilon (user-level, delta = 1/n_users); dashed: epsilon = inf")
        ax.set_ylabel(metric.upper() if metric == "mae" else "nDCG@3")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{res['dataset']}: private {res['method']} (mean ± std over seeds {res['seeds']})"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
