"""The cold-start script killed with SIGKILL mid-training, then resumed: the results equal an
uninterrupted run's; a workdir holding a run is refused without --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from tests.conftest import REPO, write_ml100k


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# ---------------------------------------------------------------- the script, killed with SIGKILL
def _script(workdir, data_dir, *extra):
    settings = {
        "data_dir": data_dir,
        "seeds": "0,1",
        "algos": "maml,fomaml",
        "baselines": "global_mean,no_adapt,finetune",
        "epochs": 3,
        "patience": 3,
        "meta_batch": 8,
        "embed_dim": 4,
        "hidden": 8,
        "inner_steps": 2,
        "ckpt_every": 2,
        "curve_steps": "0,2",
        "curve_support": "3,5",
        "progress": False,
        "report": False,
    }
    overrides = [f"--config.{k}={v}" for k, v in settings.items()]
    return [
        sys.executable,
        "-m",
        "experiments.coldstart.main",
        f"--workdir={workdir}",
        *overrides,
        *extra,
    ]


def _comparable(res):
    train = {
        s: {k: v for k, v in info.items() if k not in ("seconds", "resumed")}
        for s, info in res["training"].items()
    }
    for info in train.values():
        info["histories"] = {a: _strip(h) for a, h in info["histories"].items()}
    return res["results"], res["per_seed"], train, res.get("adaptation")


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
    data_dir = write_ml100k(
        tmp_path / "ml-100k", n_users=150, n_items=120, min_per_user=14, max_per_user=60, seed=11
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    out = subprocess.run(
        _script(ref_dir, data_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]

    proc = subprocess.Popen(
        _script(run_dir, data_dir),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = run_dir / "checkpoints" / "seed0" / "maml"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if first.is_dir() and any(p.name.isdigit() for p in first.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists()

    again = subprocess.run(
        _script(run_dir, data_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode != 0 and "pass --resume to continue it" in again.stderr
    resumed = subprocess.run(
        _script(run_dir, data_dir, "--resume"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step" in (run_dir / "train_log.txt").read_text()
    ref = json.loads((ref_dir / "results.json").read_text())
    res = json.loads((run_dir / "results.json").read_text())
    assert _comparable(res) == _comparable(ref)
    # a second --resume of the finished run reads every unit back and changes nothing
    third = subprocess.run(
        _script(run_dir, data_dir, "--resume"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert third.returncode == 0 and "finished earlier" in third.stdout
    assert _comparable(json.loads((run_dir / "results.json").read_text())) == _comparable(ref)
    for key in ("command", "config", "versions", "data", "seeds"):
        assert key in res
    assert res["data"]["sha256"] and res["versions"]["jax"] == jax.__version__
