"""The private experiment end to end (quick config on a small MovieLens-shaped dataset): results,
privacy table and figure; --resume reads finished units back; a bad config value is one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from experiments.private import pipeline
from experiments.private.configs import quick
from metarec.meta import accounting
from tests.conftest import REPO, write_ml100k


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_ml100k(
        tmp_path_factory.mktemp("data") / "ml-100k",
        n_users=150,
        n_items=120,
        min_per_user=14,
        max_per_user=60,
        seed=11,
    )


def _cfg(data_dir):
    cfg = quick.get_config()
    cfg.data_dir = data_dir
    return cfg


@pytest.mark.slow
def test_quick_config_end_to_end_then_resume_reads_units_back(tmp_path, data_dir, capsys):
    workdir = str(tmp_path / "run")
    res = pipeline.main(_cfg(data_dir), workdir, argv=["-m", "experiments.private.main"])
    for name in ("results.json", "results.md", "config.json", "run.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.path.getsize(os.path.join(workdir, "report", "privacy_utility.png")) > 1000
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved["results"] == res["results"]
    # the grid ran on validation users only and its choice is recorded
    sel = saved["selection"]
    assert [g["meta_lr"] for g in sel["grid"]] == [0.003, 0.01]
    best = min(sel["grid"], key=lambda g: g["val_mae"])
    assert (sel["l2_clip"], sel["meta_lr"]) == (best["l2_clip"], best["meta_lr"])
    # privacy table: calibrated noise meets the target at delta = 1/n_users; inf = no noise
    rows = {r["label"]: r for r in saved["privacy"]}
    assert set(rows) == {"4", "inf"}
    r = rows["4"]
    assert r["delta"][0] == pytest.approx(1 / r["n_users"][0])
    assert r["epsilon_achieved"][0] <= 4.0
    assert r["epsilon_achieved"][0] == accounting.epsilon(
        r["sigma"][0], r["q"][0], r["steps"], r["delta"][0]
    )
    assert r["truncated"] == 0
    assert rows["inf"]["sigma"] == [0.0] and rows["inf"]["epsilon_achieved"] == ["inf"]
    assert rows["inf"]["l2_clip"] == "inf"
    for s in pipeline.SCENARIOS:
        for lab in ("4", "inf"):
            assert math.isfinite(saved["results"][s][lab]["mae"]["mean"])
    units = sorted(os.listdir(os.path.join(workdir, "units", "seed0")))
    assert units == ["eps4.json", "epsinf.json"]
    # resume: every unit is read back, same results
    capsys.readouterr()
    again = pipeline.main(_cfg(data_dir), workdir, resume=True, argv=["-m", "x"])
    assert again["results"] == res["results"] and again["privacy"] == res["privacy"]
    out = capsys.readouterr().out
    assert out.count("finished earlier, read back") == 4  # 2 grid units + 2 final units


def test_bad_config_value_is_one_error_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.private.main",
            f"--workdir={tmp_path / 'w'}",
            "--config=experiments/private/configs/quick.py",
            "--config.epsilons=0,inf",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("private: error: --config.epsilons=")
    assert "positive numbers or inf" in lines[0]
    assert not os.path.exists(tmp_path / "w")
