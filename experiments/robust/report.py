"""Tables (results.md) and the attack figure of the robustness experiment's results.json."""

from __future__ import annotations

import os

from experiments.coldstart.build import TEST_SCENARIOS
from experiments.common import format_mean_std


def _cell(v, n, w=17):
    return f"{format_mean_std(v, n):>{w}s}"


def tables(res: dict) -> str:
    n = len(res["seeds"])
    cfg = res["config"]
    tm = res["threat_model"]
    sel = res["selection"]["chosen"]
    spread = "mean ± sample std over seeds" if n > 1 else "one seed"
    lines = [
        f"{res['dataset']} / seeds {res['seeds']} / {res['method']} / {spread}",
        f"threat model: {tm['ball']} on {tm['tables']}; {tm['attacker']}; PGD {tm['pgd_steps']} "
        f"steps from {tm['pgd_start']}",
        f"robust training: {cfg['train_attack']} ({cfg['train_steps']} step) on '{cfg['where']}', "
        f"eps_train {sel['eps_train']}, lam {sel['lam']} (chosen on seed "
        f"{res['selection']['seed']}'s validation users by val PGD@{cfg['budget']} MAE + val MAE)",
        "",
        "(a) evaluation under attack: MAE (nDCG@3) after PGD at budget eps; MAE increase vs eps=0",
    ]
    eps = list(res["attack"][TEST_SCENARIOS[0]]["standard"]["pgd"])
    fg = list(res["attack"][TEST_SCENARIOS[0]]["standard"]["fgsm"])
    head = (
        f"{'scenario':15s} {'training':9s} {'metric':9s}"
        + "".join(f"{'eps=' + e:>17s}" for e in eps)
        + "".join(f"{'FGSM ' + e:>17s}" for e in fg)
    )
    lines += [head, "-" * len(head)]
    for s in TEST_SCENARIOS:
        for model in ("standard", "robust"):
            a = res["attack"][s][model]
            for metric in ("mae", "ndcg@3"):
                row = (
                    f"{s:15s} {model:9s} {metric:9s}"
                    + "".join(_cell(a["pgd"][e][metric], n) for e in eps)
                    + "".join(_cell(a["fgsm"][e][metric], n) for e in fg)
                )
                lines.append(row)
            row = (
                f"{s:15s} {model:9s} {'MAE inc':9s}"
                + "".join(_cell(a["mae_increase"][e], n) for e in eps)
                + "".join(_cell(a["fgsm_mae_increase"][e], n) for e in fg)
            )
            lines.append(row)
        lines.append("")
    t = res["target"]
    lines.append(f"target (PGD eps={t['budget']}): robust training reduces the MAE increase")
    for s in TEST_SCENARIOS:
        r = t[s]
        rel = "" if r["relative_reduction"] is None else f" ({100 * r['relative_reduction']:.0f}%)"
        lines.append(
            f"  {s:15s} standard +{r['standard_increase']:.4f}  robust +{r['robust_increase']:.4f}"
            f"  reduction {r['reduction']:+.4f}{rel}  "
            + {True: "met", False: "MISSED", None: "n/a (no attacked row is read)"}[r["met"]]
        )
    inj = res["injected"]
    first = next(iter(inj.values()))
    lines += [
        "",
        f"(b) profile injection: {cfg['inject_kind']} push attack, {cfg['inject_fraction']} of the "
        f"training users ({first['n_users']} fake users, {first['n_ratings']} ratings per seed, "
        f"{cfg['inject_targets']} targets); clean test users",
    ]
    head = f"{'scenario':15s} {'training':9s}" + "".join(
        f"{h:>17s}" for h in ("MAE clean-data", "MAE poisoned", "nDCG@3 poisoned", "target shift")
    )
    lines += [head, "-" * len(head)]
    for s in TEST_SCENARIOS:
        for model in ("standard", "robust"):
            r = res["injection"][s][model]
            lines.append(
                f"{s:15s} {model:9s}"
                + _cell(r["clean"]["mae"], n)
                + _cell(r["poisoned"]["mae"], n)
                + _cell(r["poisoned"]["ndcg@3"], n)
                + _cell(r["target_shift"], n)
            )
    if "wall_seconds" in res:
        lines += ["", f"wall time {res['wall_seconds']:.0f} s; command: {res.get('command')}"]
    return "```\n" + "\n".join(lines) + "\n```"


def plot_attack(res: dict, out_dir: str) -> str:
    """``robust_attack.png``: MAE increase vs PGD budget, standard vs robust, per scenario."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, len(TEST_SCENARIOS), figsize=(4 * len(TEST_SCENARIOS), 3.4))
    for ax, s in zip(axes, TEST_SCENARIOS):
        for model, style in (("standard", "o-"), ("robust", "s--")):
            inc = res["attack"][s][model]["mae_increase"]
            x = [float(e) for e in inc]
            ax.errorbar(
                x,
                [inc[e]["mean"] for e in inc],
                yerr=[inc[e]["std"] for e in inc],
                fmt=style,
                capsize=3,
                label=model,
            )
        ax.axvline(res["target"]["budget"], color="grey", lw=0.8, ls=":")
        ax.set_title(s)
        ax.set_xlabel("PGD budget eps (x RMS row norm)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MAE increase over eps = 0")
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "robust_attack.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
