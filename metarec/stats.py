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
