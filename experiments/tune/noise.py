"""How much of a tune stage's choice is its validation users' noise (``tune.json``'s
``selection_noise``). It changes no choice: the stage still takes the lowest objective.

Per method, from every scored trial's per-user validation metrics (``trials_per_user.json``):

* ``split_half`` — :func:`metarec.stats.split_half_selection`: choose on a random half of every
  stand-in's users of every seed, score on the other half; how much better the winner looks than
  it is on unseen users, and how often the halves agree;
* ``chosen_vs`` — :func:`metarec.stats.paired_objective_ci` of the chosen trial against the
  runner-up and, for a warm-started search (whose first two trials are enqueued), the configured
  point (trial 0) and the warm start (trial 1).

A half has half the users, so the split-half numbers overstate the noise of the whole set by
about sqrt(2); they are a scale, not a correction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from metarec import stats

N_SPLITS = 500
N_BOOT = 2000


def cells(per_user: dict, weights: dict[str, float], k: int) -> tuple[list[int], list[dict]]:
    """``(trial numbers, cells)`` of one method: a cell per stand-in set and seed, the set's
    objective weight shared equally by its seeds, ``[trials, users]`` arrays (NaN where a metric
    is undefined). Every trial must have scored the same users in the same order."""
    trials = sorted(per_user, key=int)
    first = per_user[trials[0]]
    out = []
    for name, weight in weights.items():
        if not weight or name not in first:
            continue
        seeds = first[name]
        for s, rec in enumerate(seeds):
            if rec is None:
                raise ValueError(f"selection noise: seed {s} has no {name} users")
            recs = [per_user[t][name][s] for t in trials]
            if any(r["user"] != rec["user"] for r in recs):
                raise ValueError(f"selection noise: trials scored different {name} users")

            def arr(metric, recs=recs):
                return np.array([[np.nan if v is None else v for v in r[metric]] for r in recs])

            out.append({"weight": weight / len(seeds), "mae": arr("mae"), "ndcg": arr(f"ndcg@{k}")})
    return [int(t) for t in trials], out


def selection_noise(
    res: dict,
    per_user: dict,
    weights: dict[str, float],
    ndcg_weight: float,
    k: int,
    warm_started=(),
    log_fn: Callable = print,
) -> dict:
    """``selection_noise`` of every method with more than one scored trial. ``res``: the stage's
    output (``trials``: method -> rows, best first; ``baselines_validation``); ``per_user``:
    ``{"methods": method -> trial -> per-user records, "baselines": baseline -> set -> per-seed
    records}``; ``weights``: stand-in set -> its weight in the objective; ``warm_started``: the
    methods searched with a warm start."""
    trial_rows, records = res["trials"], per_user["methods"]
    out = {}
    for method, rows in trial_rows.items():
        if len(records.get(method, {})) < 2:
            continue
        trials, cs = cells(records[method], weights, k)
        logged = {r["trial"]: r["objective"] for r in rows}
        full = stats.cell_objectives(cs, ndcg_weight)
        split = stats.split_half_selection(cs, ndcg_weight, N_SPLITS, seed=0)
        pos = {t: i for i, t in enumerate(trials)}
        ranked = [r["trial"] for r in rows if r["trial"] in pos]
        chosen = ranked[0]
        others = {f"runner-up (trial {ranked[1]})": ranked[1]}
        if method in warm_started:  # each trial once, under its first name
            for name, t in (("configured (trial 0)", 0), ("warm start (trial 1)", 1)):
                if t not in others.values():
                    others[name] = t
        vs = {
            name: stats.paired_objective_ci(cs, pos[chosen], pos[t], ndcg_weight, N_BOOT)
            for name, t in others.items()
            if t in pos and t != chosen
        }
        out[method] = {
            "trials": trials,
            "chosen": chosen,
            # the stage's logged objective rebuilt from the per-user values (float32 means)
            "max_rebuild_error": float(max(abs(full[pos[t]] - logged[t]) for t in trials)),
            "split_half": split
            | {
                "win_share": dict(zip(map(str, trials), split["win_share"])),
                "held_out": dict(zip(map(str, trials), split["held_out"])),
            },
            "chosen_vs": vs,
            "chosen_vs_baselines": vs_baselines(
                records[method][chosen], per_user["baselines"], res["baselines_validation"], k
            ),
        }
        log_fn(
            f"{method} selection noise ({split['n_splits']} half splits): the half-A winner "
            f"scores {split['winner_in_sample']:.4f} on A and {split['winner_held_out']:.4f} on B "
            f"(optimism {split['optimism']:.4f}, regret {split['regret']:.4f}, same winner "
            f"{split['same_winner']:.0%}); chosen trial {chosen} wins "
            f"{out[method]['split_half']['win_share'][str(chosen)]:.0%} of the halves"
        )
        for name, v in vs.items():
            log_fn(
                f"  trial {chosen} - {name}: {v['diff']:+.4f} "
                f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
            )
        for part, metrics in out[method]["chosen_vs_baselines"].items():
            for m, v in metrics.items():
                log_fn(
                    f"  {part} {m}: trial {chosen} - {v['baseline']}: {v['mean_diff']:+.4f} "
                    f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] p={v['wilcoxon_p']:.2g} "
                    f"(n={v['n']})"
                )
    return out


def vs_baselines(chosen: dict, baselines: dict, means: dict, k: int) -> dict:
    """Per stand-in set and metric: the chosen trial minus the best baseline there (by its mean
    over seeds: lowest MAE, highest nDCG@k), paired over the set's users of every seed
    (:func:`metarec.stats.paired_comparison`, as the results table compares on test users)."""
    out = {}
    for part, seeds in chosen.items():
        for m, sign in (("mae", 1), (f"ndcg@{k}", -1)):
            scored = {b: v[f"{part}_{m}"] for b, v in means.items() if part in baselines.get(b, {})}
            scored = {b: v for b, v in scored.items() if np.isfinite(v)}
            if not scored or any(r is None for r in seeds):
                continue
            best = min(scored, key=lambda b: sign * scored[b])
            a = stats.pool_seeds(enumerate(seeds), (m,))
            b = stats.pool_seeds(enumerate(baselines[best][part]), (m,))
            cmp = stats.paired_comparison(a, b, m)
            out.setdefault(part, {})[m] = {"baseline": best} | cmp
    return out
