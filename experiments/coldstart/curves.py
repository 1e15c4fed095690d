"""Adaptation curves of a trained learner on the test scenarios: MAE against the number of inner
steps and against the support-set size (reported in the results and the report's figures)."""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.coldstart.build import Compiled, SeedData
from metarec import data as mdata
from metarec import metrics as mmetrics
from metarec.training.meta_train import predict_tasks, score


def subsample_support(
    sets: mdata.UserSets, size: int, *, strict: bool = True, scenario: str = ""
) -> mdata.UserSets:
    """Keep the first ``size`` support ratings of every user (the protocol's support order is
    already a seeded random permutation, so these are a random subset; for the time protocol the
    earliest).

    ``strict``: a user with fewer than ``size`` support ratings raises ``ValueError`` naming the
    user, the scenario and what is available; otherwise such users are left out. The support width
    is kept.
    """
    if size < 0:
        raise ValueError(f"support size must be >= 0, got {size}")
    have = sets.support_mask.sum(1).astype(int)
    short = have < size
    if strict and short.any():
        i = int(np.flatnonzero(short)[0])
        where = f"scenario {scenario}: " if scenario else ""
        raise ValueError(
            f"{where}user {int(sets.user_id[i])} has {have[i]} support ratings, fewer than the "
            f"requested {size} ({int(short.sum())} of {sets.n_users} users are short; smallest "
            f"support set {int(have.min())})"
        )
    out = sets.select(~short)
    keep = (np.arange(out.support_mask.shape[1])[None, :] < size).astype(out.support_mask.dtype)
    return dataclasses.replace(
        out,
        support_item=out.support_item * keep.astype(out.support_item.dtype),
        support_rating=out.support_rating * keep.astype(out.support_rating.dtype),
        support_mask=out.support_mask * keep,
        support_time=out.support_time * keep.astype(out.support_time.dtype),
    )


def adaptation_curves(
    fns: Compiled, spec, name: str, params, sd: SeedData, cfg, scale, new_params=None
) -> dict:
    """Test MAE of the trained meta-parameters ``params`` of learner ``name`` per scenario
    (a) versus the number of inner steps (``cfg.curve_steps``; 0 = the initialisation, not adapted)
    and (b) versus the support-set size (``cfg.curve_support``; each user's first ``n`` support
    ratings, users with fewer left out and counted; the offset feature is recomputed from the
    subset). New items are predicted with ``new_params`` where given, as the results are. Returns
    ``{"steps": {scenario: {k: mae}}, "support": {scenario: {n: {"mae", "n_users"}}}}``."""
    out: dict = {"steps": {s: {} for s in sd.test}, "support": {s: {} for s in sd.test}}
    for k in cfg.curve_steps:
        # 0 steps is the initialisation, which the trained learner's own eval also predicts
        # ("pred_init"): one compiled program fewer
        kw = {} if int(k) in (0, cfg.inner_steps) else {"inner_steps": int(k)}
        ev, key = fns.eval(spec, name, **kw), "pred_init" if int(k) == 0 else "pred"
        for s, t in sd.test.items():
            out["steps"][s][str(int(k))] = score(
                predict_tasks(ev, params, t, cfg.eval_chunk, new_params)[key], t, scale, cfg.k
            )["mae"]
    ev = fns.eval(spec, name)
    for n in cfg.curve_support:
        for s, sets in sd.test_sets.items():
            sub = subsample_support(sets, int(n), strict=False)
            if sub.n_users == 0:
                continue
            t = sd.encode(sub)
            pred = predict_tasks(ev, params, t, cfg.eval_chunk, new_params)["pred"]
            mae = score(pred, t, scale, cfg.k)["mae"]
            out["support"][s][str(int(n))] = {"mae": mae, "n_users": sub.n_users}
    return out


def aggregate_curves(curves: list[dict]) -> dict:
    """Mean and sample std over seeds of :func:`adaptation_curves` outputs (points present in every
    seed only); ``n_users`` of the support curve is the mean over seeds."""
    agg: dict = {"algo": curves[0]["algo"], "n_seeds": len(curves), "steps": {}, "support": {}}
    for s in curves[0]["steps"]:
        ks = [k for k in curves[0]["steps"][s] if all(k in c["steps"].get(s, {}) for c in curves)]
        agg["steps"][s] = {
            k: mmetrics.mean_std_over_seeds([c["steps"][s][k] for c in curves]) for k in ks
        }
    for s in curves[0]["support"]:
        ns = [
            n for n in curves[0]["support"][s] if all(n in c["support"].get(s, {}) for c in curves)
        ]
        agg["support"][s] = {
            n: {
                "mae": mmetrics.mean_std_over_seeds([c["support"][s][n]["mae"] for c in curves]),
                "n_users": float(np.mean([c["support"][s][n]["n_users"] for c in curves])),
            }
            for n in ns
        }
    return agg
