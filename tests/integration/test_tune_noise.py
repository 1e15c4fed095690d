"""The tune stage's selection-noise report (experiments/tune/noise.py) on hand-made per-user
records: it rebuilds the stage's objective, names the chosen trial and compares it pairwise."""

import numpy as np
import pytest

from experiments.tune import noise
from experiments.tune import pipeline as tune


def _records(rng, n_trials, sizes):
    """method records: trial -> set -> per seed ``{"user", "mae", "ndcg@3"}``, one nDCG None."""
    out = {}
    for t in range(n_trials):
        out[t] = {}
        for name, users in sizes.items():
            seeds = []
            for s, n in enumerate(users):
                ndcg = rng.uniform(0.4, 1.0, n).tolist()
                ndcg[0] = None  # undefined for that user: skipped by every mean
                mae = rng.uniform(0.5, 1.0, n).tolist()
                seeds.append(
                    {"user": list(range(100 * s, 100 * s + n)), "mae": mae, "ndcg@3": ndcg}
                )
            out[t][name] = seeds
    return out


def _rows(records, weights):
    """The stage's rows: per-set means per seed, averaged over seeds, then the objective."""
    rows = []
    for t, rec in records.items():
        row = {"trial": t}
        for name, seeds in rec.items():
            for m in ("mae", "ndcg@3"):
                per_seed = [np.mean([v for v in s[m] if v is not None]) for s in seeds]
                row[f"{name}_{m}"] = float(np.mean(per_seed))
        row["objective"] = tune.selection_objective(row, 3, 1.0, weights["val_new"])
        rows.append(row)
    return sorted(rows, key=lambda r: r["objective"])


def test_the_report_rebuilds_the_objective_and_compares_the_chosen_trial():
    weights = {"val": 0.6, "val_new": 0.4}
    records = _records(np.random.default_rng(0), 5, {"val": (6, 7), "val_new": (9, 8)})
    rows = _rows(records, weights)
    single = {0: records[0]}
    # a baseline 0.1 worse in MAE and 0.05 better in nDCG@3 than the chosen trial for every user
    chosen = records[rows[0]["trial"]]
    shifted = {
        part: [
            {"user": r["user"], "mae": [v + 0.1 for v in r["mae"]]}
            | {"ndcg@3": [None if v is None else v + 0.05 for v in r["ndcg@3"]]}
            for r in seeds
        ]
        for part, seeds in chosen.items()
    }
    means = {f"{part}_{m}": 0.5 for part in chosen for m in ("mae", "ndcg@3")}
    res = {"trials": {"m": rows, "one": rows[:1]}, "baselines_validation": {"b": means}}
    got = noise.selection_noise(
        res,
        {"methods": {"m": records, "one": single}, "baselines": {"b": shifted}},
        weights,
        1.0,
        3,
        warm_started=("m",),
        log_fn=lambda msg: None,
    )
    assert set(got) == {"m"}  # one scored trial: nothing to compare
    rep = got["m"]
    assert rep["trials"] == [0, 1, 2, 3, 4] and rep["chosen"] == rows[0]["trial"]
    assert rep["max_rebuild_error"] < 1e-12
    assert sum(rep["split_half"]["win_share"].values()) == pytest.approx(1.0)
    runner_up = rows[1]["trial"]
    expected = {f"runner-up (trial {runner_up})"}
    expected |= {n for n, t in (("configured (trial 0)", 0), ("warm start (trial 1)", 1))}
    expected -= {n for n in expected if n.endswith(f"(trial {rep['chosen']})")}
    if runner_up in (0, 1):  # named once, as the runner-up
        expected -= {("configured (trial 0)", "warm start (trial 1)")[runner_up]}
    assert set(rep["chosen_vs"]) == expected
    vs = rep["chosen_vs"][f"runner-up (trial {runner_up})"]
    assert vs["diff"] == pytest.approx(rows[0]["objective"] - rows[1]["objective"])
    assert vs["ci95"][0] <= vs["diff"] <= vs["ci95"][1]
    base = rep["chosen_vs_baselines"]
    assert set(base) == {"val", "val_new"}
    for part in base:
        n_users = {"val": 13, "val_new": 17}[part]
        assert base[part]["mae"]["baseline"] == "b" and base[part]["mae"]["n"] == n_users
        assert base[part]["ndcg@3"]["n"] == n_users - 2  # one undefined nDCG per seed
        assert base[part]["mae"]["mean_diff"] == pytest.approx(-0.1)
        assert base[part]["ndcg@3"]["mean_diff"] == pytest.approx(-0.05)


def test_trials_scored_on_different_users_are_refused():
    records = _records(np.random.default_rng(1), 2, {"val": (4,)})
    records[1]["val"][0]["user"] = [9, 8, 7, 6]
    with pytest.raises(ValueError, match="trials scored different val users"):
        noise.cells(records, {"val": 1.0}, 3)


@pytest.mark.slow  # a three-trial stage (about 20 s); CI runs `make test-slow` too
def test_the_stage_writes_per_user_records_and_the_report_beside_an_unchanged_config(
    fixture_data, tmp_path
):
    import json

    from experiments.tune.configs import default as tune_config
    from tests.integration.test_coldstart import tiny_config

    _, folder = fixture_data
    cfg = tune_config.get_config()
    cfg.base = tiny_config()
    cfg.base.data_dir, cfg.base.epochs = str(folder), 1
    cfg.base.val_new_model = "separate"  # two models per trial and seed
    cfg.seeds, cfg.n_trials, cfg.cold_user_weight = (0,), 3, 0.0
    cfg.spaces = {"cf_metasgd": {"inner_lr": "log:0.05:1.0"}}
    cfg.warm_starts = {"cf_metasgd": {"inner_lr": 0.1}}
    cfg.write_config = str(tmp_path / "tuned.json")
    tune.main(cfg, str(tmp_path / "w"))
    out = json.loads((tmp_path / "w" / "tune.json").read_text())
    written = json.loads((tmp_path / "tuned.json").read_text())
    assert set(written) == {"methods", "validation", "baselines_validation", "recommended"} | {
        "provenance"
    }
    assert "val_new_model=separate" in written["provenance"]["objective"]
    assert all(len(r["best_epochs_new"]) == 1 for r in out["trials"]["cf_metasgd"])
    rep = out["selection_noise"]["cf_metasgd"]
    assert rep["trials"] == [0, 1, 2] and rep["max_rebuild_error"] < 1e-5
    assert set(rep["chosen_vs"]) >= {f"runner-up (trial {out['trials']['cf_metasgd'][1]['trial']})"}
    assert set(rep["chosen_vs_baselines"]) == {"val", "val_new"}
    per_user = json.loads((tmp_path / "w" / "trials_per_user.json").read_text())
    assert set(per_user["methods"]["cf_metasgd"]) == {"0", "1", "2"}
    # every baseline of the tiny config but no_adapt, fine-tuning included
    assert set(per_user["baselines"]) == {"global_mean", "user_mean", "item_mean", "finetune"}
    val_users = per_user["methods"]["cf_metasgd"]["0"]["val"][0]["user"]
    for b in ("item_mean", "finetune"):
        assert per_user["baselines"][b]["val"][0]["user"] == val_users
