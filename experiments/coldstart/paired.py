"""Paired statistics of the recommended method against the best baseline (PROTOCOL.md step 9)."""

from __future__ import annotations

from metarec import data as mdata
from metarec import stats as mstats


def paired_tests(per_user: dict, cfg, results: dict) -> dict:
    """For ``cfg.recommended`` against the best non-meta baseline of every scenario (lowest mean
    MAE; highest mean nDCG@k, which may be another baseline): the per-user paired comparison of
    :func:`metarec.stats.paired_comparison`, users pooled over seeds. Empty when the recommended
    method is not run."""
    rec = cfg.get("recommended", "")
    if rec not in cfg.algos:
        return {}
    baselines = [b for b in cfg.baselines if b != "no_adapt"]
    ndcg = f"ndcg@{cfg.k}"
    out = {}
    for s in mdata.SCENARIOS:
        pooled = {}
        for m in [rec, *baselines]:
            rows = [(seed, r[s][m]) for seed, r in per_user.items() if m in r[s]]
            pooled[m] = mstats.pool_seeds(rows, ("mae", ndcg))
        out[s] = {}
        for metric, pick in (("mae", min), (ndcg, max)):
            cands = [b for b in baselines if b in results[s]]
            if not cands:
                continue
            best = pick(cands, key=lambda b, metric=metric: results[s][b][metric]["mean"])
            out[s][metric] = {"method": rec, "baseline": best} | mstats.paired_comparison(
                pooled[rec], pooled[best], metric, seed=0
            )
    return out


def paired_rows(paired: dict):
    """``(scenario, metric, comparison)`` for every paired test, in table order."""
    for s, by_metric in paired.items():
        for metric, c in by_metric.items():
            yield s, metric, c


def format_paired(paired: dict) -> str:
    """The paired tests as lines under the table."""
    lines = [
        "paired per-user comparison, users pooled over seeds (difference = method - baseline; "
        "95% paired-bootstrap interval; Wilcoxon signed-rank p)"
    ]
    for s, metric, c in paired_rows(paired):
        lo, hi = c["ci95"]
        lines.append(
            f"{s:15s} {metric:7s} {c['method']} - {c['baseline']}: {c['mean_diff']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] p={c['wilcoxon_p']:.2g} (n={c['n']})"
        )
    return "\n".join(lines)
