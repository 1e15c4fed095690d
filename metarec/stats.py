"""Paired comparisons of two methods over the same users (PROTOCOL.md step 9).

Both methods are scored on the same users, so the per-user differences carry the comparison: a
paired bootstrap gives a confidence interval of their mean and the Wilcoxon signed-rank test a
p-value for "no difference". Users of several seeds are pooled (a user of seed 0 and the same
user of seed 1 are different evaluation units: different splits, different trained models).
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap_ci(
    diff, n_boot: int = 10000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap ``(lo, hi)`` of the mean of paired differences ``diff`` (resampling
    users with replacement, ``default_rng(seed)``)."""
    d = np.asarray(diff, np.float64)
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # bounded memory for large user sets
        stop = min(n_boot, start + 1000)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def wilcoxon_p(diff) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zero differences dropped,
    scipy's default); 1.0 when every difference is zero."""
    from scipy import stats

    d = np.asarray(diff, np.float64)
    if d.size == 0 or not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def pair_values(a: dict, b: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Align two ``{"unit": keys, metric: values}`` records on their keys; keys where either value
    is missing (``None``) are dropped. Returns ``(values_a, values_b)``."""
    vb = {k: v for k, v in zip(b["unit"], b[metric]) if v is not None}
    pairs = [(va, vb[k]) for k, va in zip(a["unit"], a[metric]) if va is not None and k in vb]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pairs)
    return np.asarray(x, np.float64), np.asarray(y, np.float64)


def pool_seeds(records, metrics) -> dict:
    """Per-seed per-user records ``(seed, {"user": ids, metric: values})`` pooled into one
    ``{"unit": "seed:user" keys, metric: values}`` record, as :func:`pair_values` reads it."""
    records = list(records)
    out = {"unit": [f"{seed}:{u}" for seed, r in records for u in r["user"]]}
    return out | {m: [v for _, r in records for v in r[m]] for m in metrics}


def paired_comparison(a: dict, b: dict, metric: str, n_boot: int = 10000, seed: int = 0) -> dict:
    """``a`` minus ``b`` on ``metric`` over the users both have: ``n``, the mean difference, its
    paired-bootstrap 95% interval and the Wilcoxon signed-rank p-value."""
    x, y = pair_values(a, b, metric)
    d = x - y
    lo, hi = paired_bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return {
        "n": int(d.size),
        "mean_a": float(x.mean()) if d.size else float("nan"),
        "mean_b": float(y.mean()) if d.size else float("nan"),
        "mean_diff": float(d.mean()) if d.size else float("nan"),
        "ci95": [lo, hi],
        "wilcoxon_p": wilcoxon_p(d),
    }


# Selection noise: how much of a tune stage's choice is the validation users' noise. A cell is one
# stand-in set of one seed: {"weight": w, "mae": [T, U], "ndcg": [T, U]} (trials x users, NaN where
# a metric is undefined for a user); a trial's objective is sum_c w_c (mean_u mae - l mean_u ndcg).


def cell_objectives(cells, ndcg_weight: float = 1.0, masks=None) -> np.ndarray:
    """``[T]`` selection objective of every trial over the users ``masks`` keeps (one boolean
    ``[U]`` per cell; all users by default)."""
    total = 0.0
    for i, c in enumerate(cells):
        keep = slice(None) if masks is None else masks[i]
        mae, ndcg = np.asarray(c["mae"])[:, keep], np.asarray(c["ndcg"])[:, keep]
        total = total + c["weight"] * (_nanmean(mae) - ndcg_weight * _nanmean(ndcg))
    return np.asarray(total, np.float64)


def _nanmean(a) -> np.ndarray:
    ok = np.isfinite(a)
    return np.where(ok, a, 0.0).sum(-1) / np.maximum(ok.sum(-1), 1)


def split_half_selection(cells, ndcg_weight: float = 1.0, n_splits: int = 200, seed: int = 0):
    """Choose on one random half of every cell's users, score on the other half (``n_splits``
    times, ``default_rng(seed)``): what choosing the lowest objective on validation users is worth
    on users it did not see. Returns ``winner_in_sample`` / ``winner_held_out`` (the mean
    objective of the half-A winner on A and on B), ``optimism`` (their difference: how much better
    a winner looks than it is), ``regret`` (held-out objective of the A winner minus B's best),
    ``same_winner`` (share of splits where both halves pick the same trial), and per trial
    ``win_share`` (share of splits it wins on A) and ``held_out`` (its mean objective on B)."""
    rng = np.random.default_rng(seed)
    n_trials = np.asarray(cells[0]["mae"]).shape[0]
    wins, held = np.zeros(n_trials), np.zeros(n_trials)
    ins, out, regret, same = [], [], [], 0
    for _ in range(n_splits):
        masks = []
        for c in cells:
            n = np.asarray(c["mae"]).shape[1]
            a = np.zeros(n, bool)
            a[rng.permutation(n)[: n // 2]] = True
            masks.append(a)
        oa = cell_objectives(cells, ndcg_weight, masks)
        ob = cell_objectives(cells, ndcg_weight, [~m for m in masks])
        w = int(np.argmin(oa))
        wins[w] += 1
        held += ob
        ins.append(oa[w])
        out.append(ob[w])
        regret.append(ob[w] - ob.min())
        same += int(np.argmin(ob) == w)
    return {
        "n_splits": n_splits,
        "winner_in_sample": float(np.mean(ins)),
        "winner_held_out": float(np.mean(out)),
        "optimism": float(np.mean(out) - np.mean(ins)),
        "regret": float(np.mean(regret)),
        "same_winner": same / n_splits,
        "win_share": (wins / n_splits).tolist(),
        "held_out": (held / n_splits).tolist(),
    }


def paired_objective_ci(
    cells, a: int, b: int, ndcg_weight: float = 1.0, n_boot: int = 2000, seed: int = 0
) -> dict:
    """Objective of trial ``a`` minus trial ``b`` on the same users, with a percentile bootstrap
    95% interval (users resampled with replacement within every cell, ``default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    full = cell_objectives(cells, ndcg_weight)
    boot = np.zeros(n_boot)
    for c in cells:
        mae, ndcg = np.asarray(c["mae"])[[a, b]], np.asarray(c["ndcg"])[[a, b]]
        idx = rng.integers(0, mae.shape[1], size=(n_boot, mae.shape[1]))
        m, g = _nanmean(mae[:, idx]), _nanmean(ndcg[:, idx])  # [2, n_boot]
        boot += c["weight"] * ((m[0] - m[1]) - ndcg_weight * (g[0] - g[1]))
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"diff": float(full[a] - full[b]), "ci95": [float(lo), float(hi)]}
