"""End-to-end cold-start experiment on a small fixture dataset: structure of results.json (PROTOCOL.md),
seeded determinism, flag validation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from metarec import coldstart
from metarec.data import readers
from metarec.data.movielens import clean
from tests.conftest import write_ml100k


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    d = write_ml100k(tmp_path_factory.mktemp("cs") / "ml-100k", n_users=150, n_items=120,
                     min_per_user=14, max_per_user=60, seed=11)  # fmt: skip
    return clean(readers.read_any(d), "ml-100k"), d


def tiny_config():
    cfg = coldstart.default_config()
    cfg.seeds = [0, 1]
    cfg.algos = ["maml"]
    cfg.baselines = ["global_mean", "user_mean", "item_mean", "no_adapt", "finetune"]
    cfg.epochs = 2
    cfg.finetune_epochs = 1
    cfg.finetune_lrs = [0.05]
    cfg.meta_batch = 8
    cfg.embed_dim = 4
    cfg.hidden = [8]
    cfg.inner_steps = 2
    cfg.eval_chunk = 32
    cfg.adaptation_curves = False  # covered by tests/test_report.py; saves four eval compilations here
    return cfg


@pytest.fixture(scope="module")
def tiny_run(fixture_data):
    data, _ = fixture_data
    cfg = tiny_config()
    compiled = coldstart.Compiled(cfg)
    return cfg, compiled, coldstart.run(cfg, data=data, log_fn=lambda m: None, compiled=compiled)


def test_run_writes_protocol_format(tiny_run):
    cfg, _, res = tiny_run
    assert res["dataset"] == "ml-100k" and res["protocol"] == "melu" and res["seeds"] == [0, 1]
    assert set(res["scenarios"]) >= set(coldstart.TEST_SCENARIOS)
    for s in coldstart.TEST_SCENARIOS:
        methods = res["results"][s]
        assert set(methods) == {"random", "maml", "global_mean", "user_mean", "item_mean", "no_adapt", "finetune"}
        for m, vals in methods.items():
            keys = {"ndcg@3"} if m == "random" else {"mae", "rmse", "ndcg@3"}
            assert keys <= set(vals), (s, m)
            for k in keys:
                assert set(vals[k]) == {"mean", "std"}
                assert np.isfinite(vals[k]["mean"]) and vals[k]["std"] >= 0
        # the mean over seeds is the mean of the per-seed values
        per = [res["per_seed"][str(seed)][s]["maml"]["mae"] for seed in (0, 1)]
        assert methods["maml"]["mae"]["mean"] == pytest.approx(np.mean(per))
        assert methods["maml"]["mae"]["std"] == pytest.approx(np.std(per, ddof=1))
        assert 0 <= methods["maml"]["ndcg@3"]["mean"] <= 1
    json.dumps(res)  # serialisable
    table = coldstart.format_table(res)
    assert "user_item_cold" in table and "± " in table


def test_run_is_deterministic(fixture_data, tiny_run):
    data, _ = fixture_data
    cfg, compiled, res = tiny_run
    again = coldstart.run_seed(data, 1, cfg, log_fn=lambda m: None, compiled=compiled)
    for s in coldstart.TEST_SCENARIOS:
        assert again[s] == res["per_seed"]["1"][s]


@pytest.mark.parametrize(
    "field,value,message",
    [("algos", ["mamal"], "unknown --algo"), ("baselines", ["svd"], "unknown --baselines"),
     ("adapt", "some", "--adapt='some' for --model=melu; valid: decision, all, head"), ("meta_lr", 0.0, "--meta_lr must be > 0"),
     ("seeds", [], "--seeds must name at least one seed")],
)  # fmt: skip
def test_bad_config_is_named(field, value, message):
    cfg = coldstart.default_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        coldstart.validate_config(cfg)


def test_script_rejects_bad_flags():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.meta_train", "--algo=mamal", "--workdir=/tmp/never"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "unknown --algo ['mamal']; valid: maml, fomaml, reptile, metasgd, imaml" in out.stderr


def test_grid_search_ranks_validation_maes(fixture_data):
    from metarec import tuning

    data, _ = fixture_data
    cfg = tiny_config()
    cfg.epochs = 1
    with pytest.raises(ValueError, match="unknown config field 'inner_rate'"):
        tuning.grid_search(cfg, {"inner_rate": [0.1]}, algo="fomaml", data=data)
    rows = tuning.grid_search(cfg, {"inner_lr": [0.0001, 0.05]}, algo="fomaml", seeds=(0,), data=data,
                              log_fn=lambda m: None)  # fmt: skip
    assert [r["inner_lr"] for r in rows] != [] and len(rows) == 2
    assert rows[0]["val_mae"] <= rows[1]["val_mae"]
    assert all(np.isfinite(r["val_mae"]) and r["best_epochs"] == [1] for r in rows)
