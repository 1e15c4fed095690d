"""The robustness experiment end to end on a small GroupLens-layout fixture with the quick config:
results.json / results.md / the attack figure, a --resume that reads every unit back with the same
numbers, and a bad config value reported as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.coldstart.build import TEST_SCENARIOS
from experiments.robust import pipeline
from experiments.robust.configs import quick
from tests.conftest import REPO, write_ml100k


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return write_ml100k(
        tmp_path_factory.mktemp("robust") / "ml-100k",
        n_users=150,
        n_items=120,
        min_per_user=14,
        max_per_user=60,
        seed=11,
    )


def tiny(data_dir):
    cfg = quick.get_config()
    cfg.data_dir = str(data_dir)
    cfg.inject_filler = 10
    cfg.inject_fraction = 0.1
    cfg.report = True
    return cfg


@pytest.mark.slow
def test_quick_config_end_to_end_then_resume(fixture_dir, tmp_path):
    work = str(tmp_path / "run")
    res = pipeline.main(tiny(fixture_dir), work)
    for f in ("results.json", "results.md", "report/robust_attack.png", "config.json"):
        assert os.path.exists(os.path.join(work, f)), f
    with open(os.path.join(work, "results.json")) as fh:
        saved = json.load(fh)
    assert saved["target"]["budget"] == 0.5
    assert saved["selection"]["chosen"] == saved["selection"]["candidates"][0]
    inj = saved["injected"]["0"]
    assert inj["n_users"] >= 1
    assert inj["n_ratings"] == inj["n_users"] * (10 + 5)
    for s in TEST_SCENARIOS:
        for model in ("standard", "robust"):
            a = saved["attack"][s][model]
            assert set(a["pgd"]) == {"0.0", "0.5"}
            assert a["mae_increase"]["0.0"]["mean"] == 0.0
            # PGD from the FGSM start is at least as strong as FGSM at the same budget
            assert a["mae_increase"]["0.5"]["mean"] >= a["fgsm_mae_increase"]["0.5"]["mean"] - 1e-9
            assert "target_shift" in saved["injection"][s][model]
    # resume: every unit is read back, the same numbers come out
    again = pipeline.main(tiny(fixture_dir), work, resume=True)
    for key in ("attack", "injection", "selection", "target"):
        assert json.dumps(again[key], sort_keys=True) == json.dumps(res[key], sort_keys=True)
    with open(os.path.join(work, "train_log.txt")) as fh:
        assert "finished earlier, read back" in fh.read()


def test_bad_config_value_is_one_error_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.robust.main",
            f"--workdir={tmp_path / 'w'}",
            "--config.where=query",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robust: error: --config.where="), out.stderr
    assert "allowed: both, inner, outer" in lines[0]
