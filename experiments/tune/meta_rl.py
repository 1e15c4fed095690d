"""Model selection for the meta-RL experiment on validation simulator users (never test users).

Per seed the tuning path builds the simulator with ``held_out="val"``
(:func:`experiments.meta_rl.runner.build_simulator`): ``n_val_users`` of the *training* users are
held out of the simulator's MF, of the recommender-side MF and of every agent's training, and folded
in as the test users are; the test users' sets are never read. Every candidate point is trained on
the remaining training users and scored by its CTR on the validation users after each number of
adaptation episodes in ``episodes``; the objective is minus their mean (the numbers of episodes the
targets name). The search is the cold-start stage's (:func:`experiments.tune.spaces.run_study`:
seeded optuna TPE, or a grid for a space of choices only), the recommended method is the one with
the lowest objective among the meta-learned methods, and :func:`main` writes ``tune.json`` and the
file the meta-RL default config reads (``experiments/meta_rl/configs/tuned.json``). The bandits'
own constants (``bandits/<method>/<constant>``) are searched the same way, by the same objective.
The MAML family shares one ``meta`` section: the point tuned for one of them is the setting of all
three.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import numpy as np

from experiments.common import check_choice, config_value, set_config_value
from experiments.meta_rl import runner, settings
from experiments.tune.pipeline import write_results
from experiments.tune.spaces import parse_space, run_study, start_values
from metarec.training.trainer import NonFiniteLossError

DIVERGED = 0.0  # the objective of a point whose training diverged (CTR 0)


def point_spec(base, method: str, point: dict):
    """The resolved meta-RL config of ``method`` alone with ``point``'s (dotted) fields set."""
    c = ml_collections.ConfigDict(base.to_dict())
    c.methods = (method,)
    for field, value in point.items():
        set_config_value(c, field, value)
    return settings.resolve(c)


def prepare(base, seeds) -> dict:
    """``{seed: validation SimulatorData}`` (no test user is read)."""
    spec = settings.resolve(base)
    return {seed: runner.build_simulator(spec, seed, held_out="val") for seed in seeds}


def evaluate_point(base, method: str, point: dict, sims: dict, episodes) -> dict:
    """Train ``method`` at ``point`` on every seed's training users; its validation CTR after each
    number of adaptation episodes (mean over seeds, and per seed) and the objective."""
    spec = point_spec(base, method, point)
    per_seed = runner.run_on_simulators(spec, sims)
    ctr = {
        int(n): float(np.mean([r["curves"][method]["ctr"][n] for r in per_seed.values()]))
        for n in spec.adapt_episodes
    }
    return {
        "val_ctr": ctr,
        "val_ctr_per_seed": {
            str(s): {int(n): v for n, v in r["curves"][method]["ctr"].items()}
            for s, r in per_seed.items()
        },
        "objective": -float(np.mean([ctr[n] for n in episodes])),
    }


def search(
    base,
    space: dict,
    *,
    method: str,
    sims: dict,
    n_trials: int,
    sampler_seed: int,
    episodes,
    log_fn: Callable = print,
) -> list[dict]:
    """The cold-start stage's search (:func:`experiments.tune.spaces.run_study`) of ``space``
    for ``method``, starting from the base config's values; one row per trial, best first."""
    parsed = parse_space(space, base)

    def evaluate(point):
        try:
            return evaluate_point(base, method, point, sims, episodes)
        except NonFiniteLossError as e:  # a diverging point is a bad point, not a failed search
            return {"val_ctr": {}, "objective": DIVERGED, "diverged": str(e).split(";")[0]}

    def describe(row):
        shown = {n: round(v, 4) for n, v in row["val_ctr"].items()}
        log_fn(
            f"{method} trial {row['trial']}: objective {row['objective']:.4f} CTR {shown} "
            f"{row['point']}"
        )

    start = start_values(parsed, lambda field: config_value(base, field))
    return run_study(parsed, n_trials, sampler_seed, [start], evaluate, describe)


def references(base, sims: dict, names) -> dict:
    """Validation CTR per number of episodes (mean over seeds) of untuned methods ``names`` (e.g.
    random, popular) and of the oracle: what the tuned methods are read against."""
    c = ml_collections.ConfigDict(base.to_dict())
    c.methods = tuple(names)
    spec = settings.resolve(c)
    per_seed = runner.run_on_simulators(spec, sims)
    out = {
        name: {
            int(n): float(np.mean([r["curves"][name]["ctr"][n] for r in per_seed.values()]))
            for n in spec.adapt_episodes
        }
        for name in names
    }
    out["oracle"] = float(np.mean([r["oracle"]["ctr"] for r in per_seed.values()]))
    return out


def main(cfg: ml_collections.ConfigDict, workdir: str, argv: list[str] | None = None) -> dict:
    """Tune every method of ``cfg.spaces``, name the recommended one, write ``tune.json`` to
    ``workdir`` and ``cfg.write_config`` (the meta-RL default config reads it)."""
    from experiments.common import prepare_workdir
    from metarec.training.runlog import run_metadata

    prepare_workdir(workdir, "tune")
    seeds = tuple(int(s) for s in cfg.seeds)
    episodes = tuple(int(n) for n in cfg.episodes)
    base = cfg.base
    missing = [n for n in episodes if n not in settings.resolve(base).adapt_episodes]
    if missing:
        raise ValueError(f"--config.episodes {missing} are not in --config.base.adapt_episodes")
    sims = prepare(base, seeds)
    out = {"methods": {}, "validation": {}, "trials": {}}
    for method, space in cfg.spaces.items():
        check_choice("--config.spaces", method, settings.METHODS)
        rows = search(
            base,
            dict(space),
            method=method,
            sims=sims,
            n_trials=cfg.n_trials,
            sampler_seed=cfg.sampler_seed,
            episodes=episodes,
        )
        best = rows[0]
        out["methods"][method] = best["point"]
        out["validation"][method] = {
            k: best[k] for k in ("objective", "val_ctr", "val_ctr_per_seed")
        }
        out["trials"][method] = rows
    # the recommended method is a meta-learned one; tuned bandits are what it is read against
    learned = [m for m in out["validation"] if m not in settings.BANDIT_METHODS]
    out["recommended"] = min(
        learned or out["validation"], key=lambda m: out["validation"][m]["objective"]
    )
    out["references_validation"] = references(base, sims, cfg.references)
    meta = run_metadata(cfg.to_dict(), argv)
    out["provenance"] = {
        "command": meta["command"],
        "seeds": list(seeds),
        "n_trials": cfg.n_trials,
        "sampler_seed": cfg.sampler_seed,
        "objective": f"minus the mean validation CTR after {list(episodes)} adaptation episodes",
        "spaces": {m: dict(s) for m, s in cfg.spaces.items()},
        "selected_on": f"{base.n_val_users} validation users per seed drawn from the training "
        "users, held out of every fit; no test user read",
        "versions": meta["versions"],
    }
    keys = ("methods", "validation", "references_validation", "recommended", "provenance")
    write_results(workdir, out, cfg.write_config, keys)
    for m, v in out["validation"].items():
        print(f"{m}: objective {v['objective']:.4f} val CTR {v['val_ctr']} {out['methods'][m]}")
    for m, v in out["references_validation"].items():
        print(f"reference {m}: val CTR {v}")
    print(f"recommended: {out['recommended']}")
    return out
