"""Checkpoints and --resume of the meta-RL experiment: the script SIGKILLed mid-training and resumed
bit-identically, a non-finite loss that keeps the last good checkpoint, a resumed run refusing
another config, and (slow) the full experiment killed mid-meta-training."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from experiments.meta_rl import pipeline, runner, settings
from experiments.meta_rl.configs import default
from metarec.training.checkpoint import tree_digest
from metarec.training.runlog import read_metrics, run_metadata
from metarec.training.trainer import NonFiniteLossError
from tests.conftest import REPO


# ---------------------------------------------------------------- the script, killed with SIGKILL
def _cache_env(tmp_path_factory):
    """CPU only, and a persistent compilation cache shared by the runs of a test (the second and
    third runs load the first one's executables instead of compiling them: same code, same
    numbers) instead of the user's."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        METAREC_COMPILATION_CACHE="0",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _cmd(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.meta_rl.main",
        "--config.dataset=synthetic",
        f"--workdir={workdir}",
        *extra,
    ]


def _config(**fields) -> list[str]:
    return [f"--config.{k}={v}" for k, v in fields.items()]


TINY = _config(
    n_train_users=32,
    n_test_users=8,
    n_items=20,
    **{"env.horizon": 6, "env.history_len": 3},
    adapt_episodes="0,1",
    eval_episodes=1,
    online_rounds=0,
    checkpoint_every=2,
)


def _steps(d):
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _kill_when(proc, ckpt_dir, n_steps, timeout=300):
    """SIGKILL ``proc`` as soon as ``ckpt_dir`` holds ``n_steps`` complete checkpoints."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(_steps(ckpt_dir)) < n_steps:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _comparable(res):
    per_seed = [
        {k: v for k, v in s.items() if k not in ("timings", "resumed")} for s in res["per_seed"]
    ]
    return (
        res["results"],
        res["oracle_ctr"],
        res["oracle_return"],
        per_seed,
        res["simulator_sha256"],
    )


def _final_states(workdir):
    """Digest of the newest checkpoint's full state (params, optimizer, key, ...) of every unit."""
    out = {}
    for seed_dir in sorted((workdir / "checkpoints").iterdir()):
        for unit in sorted(seed_dir.iterdir()):
            step = _steps(unit)[-1]
            state = ocp.StandardCheckpointer().restore(unit / str(step) / "state")
            out[f"{seed_dir.name}/{unit.name}"] = (step, tree_digest(state))
    return out


def _kill_resume_compare(tmp_path, env, args, kill_dir, kill_after, n_iterations, finished_units):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"

    def script(*cmd):
        return subprocess.run(
            _cmd(*cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )

    ref = script(ref_dir, *args)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(
        _cmd(run_dir, *args),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _kill_when(proc, run_dir / kill_dir, kill_after)
    killed_at = _steps(run_dir / kill_dir)
    assert 0 < killed_at[-1] < n_iterations, f"not killed mid-training: checkpoints {killed_at}"
    assert not (run_dir / "rl_results.json").exists()
    for u in finished_units:
        assert (run_dir / "units" / f"{u}.json").exists(), u

    again = script(run_dir, *args)
    assert again.returncode == 1 and "pass --resume to continue it" in again.stderr
    resumed = script(run_dir, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((ref_dir / "rl_results.json").read_text())
    b = json.loads((run_dir / "rl_results.json").read_text())
    # results, training curves, params digests: bit-identical
    assert _comparable(b) == _comparable(a)
    assert _final_states(run_dir) == _final_states(ref_dir)

    # every metrics row exactly once, equal to the uninterrupted run's
    def rows(workdir):
        return sorted(read_metrics(str(workdir)), key=lambda r: (r["unit"], r["step"]))

    assert rows(run_dir) == rows(ref_dir)
    resumed_units = [u for s in b["per_seed"] for u in s["resumed"]]
    assert b["invocations"][-1].endswith("--resume") and len(b["invocations"]) == 2
    return resumed_units, killed_at


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path, tmp_path_factory):
    """Two seeds of PPO: killed while seed 1 trains (seed 0 finished): seed 0 is read back, seed 1's
    PPO continues from its newest checkpoint, and everything equals an uninterrupted run."""
    env = _cache_env(tmp_path_factory)
    args = [*_config(seeds="0,1", methods="ppo", **{"ppo.num_updates": 40}), *TINY]
    resumed_units, killed_at = _kill_resume_compare(
        tmp_path, env, args, "checkpoints/seed1/ppo", 2, 40, ["seed0/ppo", "seed0/oracle"]
    )
    assert resumed_units == ["ppo", "oracle", f"ppo@{killed_at[-1]}"]


def _tiny_ppo_config():
    c = default.get_config()
    c.dataset, c.seeds, c.methods = "synthetic", (0,), ("ppo",)
    c.n_train_users, c.n_test_users, c.n_items = 16, 4, 12
    c.env.horizon, c.env.history_len = 4, 2
    c.adapt_episodes, c.eval_episodes = (0,), 1
    c.ppo.num_updates, c.ppo.num_envs = 8, 4
    c.checkpoint_every = 2
    return c


@pytest.mark.slow  # over 5 s per call in the default suite; CI runs `make test-slow` too
def test_non_finite_loss_keeps_last_good_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    cfg = _tiny_ppo_config()
    real_init = runner._Runner.__init__

    def poisoned_init(self, spec):  # the real PPO pieces, but iteration 6 reports a NaN loss
        real_init(self, spec)
        real = self.run["ppo"]

        def run(state, env_params, start, length):
            st, m = real(state, env_params, start, length)
            if start <= 5 < start + length:
                m = {**m, "loss": m["loss"].at[5 - start].set(jnp.nan)}
            return st, m

        self.run["ppo"] = run

    wd = tmp_path / "rl"
    monkeypatch.setattr(runner._Runner, "__init__", poisoned_init)
    with pytest.raises(NonFiniteLossError) as e:
        pipeline.run(cfg, str(wd), argv=[], progress_stream=io.StringIO())
    msg = str(e.value)
    assert msg.startswith("seed 0, method ppo: non-finite training loss (nan) at iteration 6 of 8")
    assert "last good checkpoint (iteration 4)" in msg
    assert "rerun the same command with --resume" in msg
    assert str(wd / "checkpoints" / "seed0" / "ppo") in msg
    assert _steps(wd / "checkpoints" / "seed0" / "ppo") == [2, 4]

    def train_steps():
        return [r["step"] for r in read_metrics(str(wd)) if r["unit"] == "seed0/ppo/train"]

    assert train_steps() == [1, 2, 3, 4]
    # --resume continues from iteration 4 and finishes
    monkeypatch.setattr(runner._Runner, "__init__", real_init)
    res = pipeline.run(cfg, str(wd), argv=[], progress_stream=io.StringIO(), resume=True)
    assert res["per_seed"][0]["resumed"] == ["ppo@4"]
    assert len(res["per_seed"][0]["train_logs"]["ppo_return"]) == 8
    assert train_steps() == list(range(1, 9))
    assert _steps(wd / "checkpoints" / "seed0" / "ppo") == [6, 8]


def test_resume_refuses_another_config(tmp_path):
    wd = str(tmp_path / "rl")
    cfg = default.get_config()
    cfg.dataset = "synthetic"

    def open_workdir(c, argv, resume):
        spec = settings.resolve(c)
        return pipeline.open_workdir(spec, wd, argv, resume=resume, data_sha=None, log_fn=print)

    first = open_workdir(cfg, ["-m", "first"], False)
    os.makedirs(os.path.join(wd, "units"))
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        open_workdir(cfg, ["-m", "again"], False)
    cfg.seeds = (0,)
    cfg.meta.inner_lr = 0.1
    again = open_workdir(cfg, ["-m", "lr"], True)
    assert again["invocations"] == [first["command"], run_metadata(None, ["-m", "lr"])["command"]]
    other = default.get_config()
    other.dataset, other.ppo.num_updates = "synthetic", 3
    with pytest.raises(ValueError, match=r"different config \(ppo.num_updates: 150 -> 3\)"):
        open_workdir(other, ["-m", "other"], True)


@pytest.mark.slow  # ~3-4 min on 2 cores
def test_full_run_killed_mid_meta_training_resumes_bit_identically(tmp_path, tmp_path_factory):
    """All trained methods (PPO, DQN with its replay buffer, MAML, FOMAML, Meta-SGD), bandits and
    the online loop; killed while Meta-SGD trains: finished units are read back (PPO is restored
    for nothing), Meta-SGD continues from its checkpoint, and the online loop uses its final
    state."""
    env = _cache_env(tmp_path_factory)
    args = [
        *TINY,
        *_config(
            seeds=0,
            methods="random,linucb,ppo,dqn,maml,fomaml,metasgd",
            **{
                "ppo.num_updates": 6,
                "dqn.num_iterations": 6,
                "meta.num_iterations": 30,
                "meta.meta_batch": 4,
                "meta.inner_steps": 1,
            },
            online_rounds=2,
        ),
    ]
    units = [f"seed0/{u}" for u in ("ppo", "dqn", "maml", "fomaml")]
    resumed_units, killed_at = _kill_resume_compare(
        tmp_path, env, args, "checkpoints/seed0/metasgd", 2, 30, units
    )
    assert resumed_units == ["ppo", "dqn", "maml", "fomaml", f"metasgd@{killed_at[-1]}"]
