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
    trial_rows: dict[str, list[dict]],
    per_user: dict[str, dict],
    weights: dict[str, float],
    ndcg_weight: float,
    k: int,
    warm_started=(),
    log_fn: Callable = print,
) -> dict:
    """``selection_noise`` of every method with more than one scored trial (``trial_rows``:
    method -> the stage's rows, best first; ``per_user``: method -> trial -> per-user records;
    ``weights``: stand-in set -> its weight in the objective; ``warm_started``: the methods
    searched with a warm start)."""
    out = {}
    for method, rows in trial_rows.items():
        if len(per_user.get(method, {})) < 2:
            continue
        trials, cs = cells(per_user[method], weights, k)
        logged = {r["trial"]: r["objective"] for r in rows}
        full = stats.cell_objectives(cs, ndcg_weight)
        split = stats.split_half_selection(cs, ndcg_weight, N_SPLITS, seed=0)
        pos = {t: i for i, t in enumerate(trials)}
        ranked = [r["trial"] for r in rows if r["trial"] in pos]
        chosen = ranked[0]
        others = {f"runner-up (trial {ranked[1]})": ranked[1]}
        if method in warm_started:
            others |= {"configured (trial 0)": 0, "warm start (trial 1)": 1}
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
    return out
