"""Checkpoints and --resume of the meta-RL benchmark (issue 7): the resumable host loop on a toy trainer
(pieces = one piece, crash + resume, non-finite stop, foreign checkpoints refused), the real script
SIGKILLed mid-training and resumed bit-identically, a non-finite loss that keeps the last good
checkpoint, and (slow) every trained method cut into pieces and the full benchmark killed mid-meta-training."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from metarec.training.checkpoint import Checkpointer, tree_digest
from metarec.rl import loop
from metarec.training.runlog import read_metrics
from tests.test_runs_rl_pretrain import _script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- the host loop on a toy trainer
def _toy_trainer(n=12):
    """Noisy SGD on a quadratic: params, Adam state and a PRNG key, like the RL trainers."""
    tx = optax.adam(0.1)

    def init(key):
        k_init, k_loop = jax.random.split(key)
        w = jax.random.normal(k_init, (3,))
        return {"params": w, "opt_state": tx.init(w), "key": k_loop}

    def run(state, env_params, start, length):
        def body(carry, k):
            w, s = carry
            loss, g = jax.value_and_grad(lambda w: jnp.sum((w - env_params) ** 2))(w)
            u, s = tx.update(g + 0.1 * jax.random.normal(k, w.shape), s)
            return (optax.apply_updates(w, u), s), {"loss": loss}

        keys = loop.iteration_keys(state["key"], n, start, length)
        (w, s), m = jax.lax.scan(body, (state["params"], state["opt_state"]), keys)
        return {**state, "params": w, "opt_state": s}, m

    return loop.Trainer(init, run, n)


class _Crash(Exception):
    pass


def test_loop_in_pieces_with_crash_and_resume_equals_one_piece(tmp_path):
    t = _toy_trainer()
    target = jnp.array([1.0, -2.0, 0.5])
    run = jax.jit(t.run, static_argnames="length")
    init = lambda: t.init(jax.random.PRNGKey(0))  # noqa: E731
    one, m_one = run(init(), target, 0, t.num_iterations)

    def crash_at(n):
        def on_chunk(start, m):
            if start >= n:
                raise _Crash(start)
        return on_chunk

    d = str(tmp_path / "ck")
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        with pytest.raises(_Crash):
            loop.train_checkpointed(run, init, target, t.num_iterations, every=5, checkpointer=ck, on_chunk=crash_at(5),
                                    meta={"unit": "toy"})  # fmt: skip
        assert ck.all_steps() == [5]
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        seen = []
        out = loop.train_checkpointed(run, init, target, t.num_iterations, every=5, checkpointer=ck, resume=True,
                                      on_chunk=lambda s, m: seen.append((s, len(m["loss"]))), meta={"unit": "toy"})  # fmt: skip
        assert ck.all_steps() == [10, 12] and ck.restore_meta(12)["done"]
    assert out.resumed_from == 5 and seen == [(5, 5), (10, 2)]
    assert tree_digest(out.state) == tree_digest(one)  # pieces of 5, 5 (after a crash), 2 == one piece of 12
    np.testing.assert_array_equal(out.metrics["loss"], np.asarray(m_one["loss"]))
    # a finished loop trains nothing and, with need_state=False, restores no arrays
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        again = loop.train_checkpointed(run, init, target, t.num_iterations, every=5, checkpointer=ck, resume=True,
                                        on_chunk=crash_at(0), need_state=False, meta={"unit": "toy"})  # fmt: skip
        assert again.state is None and again.resumed_from == 12
        np.testing.assert_array_equal(again.metrics["loss"], out.metrics["loss"])
        with pytest.raises(ValueError, match="written for another run"):
            loop.train_checkpointed(run, init, target, t.num_iterations, checkpointer=ck, resume=True, meta={"unit": "other"})


def test_loop_non_finite_stops_naming_iteration_and_keeps_last_good(tmp_path):
    t = _toy_trainer()
    real = jax.jit(t.run, static_argnames="length")

    def poisoned(state, env_params, start, length):  # the real piece, but iteration 7 reports NaN
        st, m = real(state, env_params, start, length)
        if start <= 6 < start + length:
            m = {"loss": m["loss"].at[6 - start].set(jnp.nan)}
        return st, m

    with Checkpointer(str(tmp_path / "ck"), keep_last=3, keep_best=0) as ck:
        with pytest.raises(loop.NonFiniteLossError) as e:
            loop.train_checkpointed(poisoned, lambda: t.init(jax.random.PRNGKey(0)), jnp.zeros(3), t.num_iterations,
                                    every=3, checkpointer=ck, name="seed 4, method toy")  # fmt: skip
        assert ck.all_steps() == [3, 6]  # the piece with the NaN (iterations 7-9) was not saved
    msg = str(e.value)
    assert msg.startswith("seed 4, method toy: non-finite training loss (nan) at iteration 7 of 12")
    assert "last good checkpoint (iteration 6)" in msg and "--resume" in msg and str(tmp_path / "ck") in msg
    assert (e.value.iteration, e.value.last_good_step) == (7, 6)
    with pytest.raises(loop.NonFiniteLossError, match="no checkpoints were written"):
        loop.train_checkpointed(poisoned, lambda: t.init(jax.random.PRNGKey(0)), jnp.zeros(3), t.num_iterations, every=12)


# ---------------------------------------------------------------- the script, killed with SIGKILL
def _cache_env(tmp_path_factory):
    """CPU only, and a persistent compilation cache shared by the runs of a test (the second and
    third runs load the first one's executables instead of compiling them: same code, same numbers)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")  # fmt: skip


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "experiments.meta_rl", "--dataset=synthetic", f"--workdir={workdir}", *extra]


TINY = ["--n_train_users=32", "--n_test_users=8", "--n_items=20", "--horizon=6", "--history_len=3",
        "--adapt_episodes=0,1", "--eval_episodes=1", "--online_rounds=0", "--checkpoint_every=2"]  # fmt: skip


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
    per_seed = [{k: v for k, v in s.items() if k not in ("timings", "resumed")} for s in res["per_seed"]]
    return res["results"], res["oracle_ctr"], res["oracle_return"], per_seed, res["simulator_sha256"]


def _final_states(workdir):
    """Digest of the newest checkpoint's full state (params, optimizer, key, ...) of every unit."""
    out = {}
    for seed_dir in sorted((workdir / "checkpoints").iterdir()):
        for unit in sorted(seed_dir.iterdir()):
            step = _steps(unit)[-1]
            out[f"{seed_dir.name}/{unit.name}"] = (step, tree_digest(ocp.StandardCheckpointer().restore(unit / str(step) / "state")))
    return out


def _kill_resume_compare(tmp_path, env, args, kill_dir, kill_after, n_iterations, finished_units):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.run(_cmd(ref_dir, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(_cmd(run_dir, *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, run_dir / kill_dir, kill_after)
    killed_at = _steps(run_dir / kill_dir)
    assert 0 < killed_at[-1] < n_iterations, f"not killed mid-training: checkpoints {killed_at}"
    assert not (run_dir / "rl_results.json").exists()
    for u in finished_units:
        assert (run_dir / "units" / f"{u}.json").exists(), u

    again = subprocess.run(_cmd(run_dir, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 1 and "pass --resume to continue it" in again.stderr
    resumed = subprocess.run(_cmd(run_dir, *args, "--resume"), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = json.loads((ref_dir / "rl_results.json").read_text()), json.loads((run_dir / "rl_results.json").read_text())
    assert _comparable(b) == _comparable(a)  # results, training curves, params digests: bit-identical
    assert _final_states(run_dir) == _final_states(ref_dir)
    # every metrics row exactly once, equal to the uninterrupted run's
    key = lambda r: (r["unit"], r["step"])  # noqa: E731
    assert sorted(read_metrics(str(run_dir)), key=key) == sorted(read_metrics(str(ref_dir)), key=key)
    resumed_units = [u for s in b["per_seed"] for u in s["resumed"]]
    assert b["invocations"][-1].endswith("--resume") and len(b["invocations"]) == 2
    return resumed_units, killed_at


def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path, tmp_path_factory):
    """Two seeds of PPO: killed while seed 1 trains (seed 0 finished): seed 0 is read back, seed 1's
    PPO continues from its newest checkpoint, and everything equals an uninterrupted run."""
    env = _cache_env(tmp_path_factory)
    args = ["--seeds=0,1", "--methods=ppo", "--ppo_updates=40", *TINY]
    resumed_units, killed_at = _kill_resume_compare(tmp_path, env, args, "checkpoints/seed1/ppo", 2, 40,
                                                    ["seed0/ppo", "seed0/oracle"])  # fmt: skip
    assert resumed_units == ["ppo", "oracle", f"ppo@{killed_at[-1]}"]


def test_non_finite_loss_keeps_last_good_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    meta_rl = _script("meta_rl")
    from metarec.rl import benchmark
    from metarec.rl import env as envlib

    cfg = dataclasses.replace(
        benchmark.BenchmarkConfig(), dataset="synthetic", seeds=(0,), methods=("ppo",), n_train_users=16,
        n_test_users=4, n_items=12, env=envlib.EnvConfig(horizon=4, history_len=2), adapt_episodes=(0,),
        eval_episodes=1, ppo=dataclasses.replace(benchmark.BenchmarkConfig.ppo, num_updates=8, num_envs=4),
    )  # fmt: skip
    real_init = benchmark._Runner.__init__

    def poisoned_init(self, config):  # the real PPO pieces, but iteration 6 reports a NaN loss
        real_init(self, config)
        real = self.run["ppo"]

        def run(state, env_params, start, length):
            st, m = real(state, env_params, start, length)
            if start <= 5 < start + length:
                m = {**m, "loss": m["loss"].at[5 - start].set(jnp.nan)}
            return st, m

        self.run["ppo"] = run

    wd = tmp_path / "rl"
    monkeypatch.setattr(benchmark._Runner, "__init__", poisoned_init)
    with pytest.raises(meta_rl.NonFiniteLossError) as e:
        meta_rl.run(cfg, str(wd), argv=[], progress_stream=io.StringIO(), checkpoint_every=2)
    msg = str(e.value)
    assert msg.startswith("seed 0, method ppo: non-finite training loss (nan) at iteration 6 of 8")
    assert "last good checkpoint (iteration 4)" in msg and "rerun the same command with --resume" in msg
    assert str(wd / "checkpoints" / "seed0" / "ppo") in msg
    assert _steps(wd / "checkpoints" / "seed0" / "ppo") == [2, 4]
    assert [r["step"] for r in read_metrics(str(wd)) if r["unit"] == "seed0/ppo/train"] == [1, 2, 3, 4]
    # --resume continues from iteration 4 and finishes
    monkeypatch.setattr(benchmark._Runner, "__init__", real_init)
    res = meta_rl.run(cfg, str(wd), argv=[], progress_stream=io.StringIO(), checkpoint_every=2, resume=True)
    assert res["per_seed"][0]["resumed"] == ["ppo@4"] and len(res["per_seed"][0]["train_logs"]["ppo_return"]) == 8
    assert [r["step"] for r in read_metrics(str(wd)) if r["unit"] == "seed0/ppo/train"] == list(range(1, 9))
    assert _steps(wd / "checkpoints" / "seed0" / "ppo") == [6, 8]


def test_resume_refuses_another_config(tmp_path):
    meta_rl = _script("meta_rl")
    from metarec.rl import benchmark

    wd = str(tmp_path / "rl")
    cfg = dataclasses.replace(benchmark.BenchmarkConfig(), dataset="synthetic")
    meta_rl.prepare_workdir(meta_rl._jsonable(cfg), wd, False, None)
    from metarec.training.runlog import run_metadata, write_json_atomic

    write_json_atomic(os.path.join(wd, "run.json"), run_metadata(meta_rl._jsonable(cfg), []) | {"data_sha256": None})
    os.makedirs(os.path.join(wd, "units"))
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        meta_rl.prepare_workdir(meta_rl._jsonable(cfg), wd, False, None)
    lr = dataclasses.replace(cfg, seeds=(0,), meta=dataclasses.replace(cfg.meta, inner_lr=0.1))
    assert meta_rl.prepare_workdir(meta_rl._jsonable(lr), wd, True, None, log_fn=lambda m: None) == [
        run_metadata(None, [])["command"]]  # fmt: skip
    other = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, num_updates=3))
    with pytest.raises(ValueError, match=r"different config \(ppo.num_updates: 150 -> 3\)"):
        meta_rl.prepare_workdir(meta_rl._jsonable(other), wd, True, None)


# ---------------------------------------------------------------- slow: every trained method
@pytest.mark.slow  # ~1-2 min on 2 cores (compiling PPO, DQN and three meta-learners twice)
def test_every_trainer_in_pieces_equals_one_piece():
    from metarec.rl import dqn, maml, networks, ppo
    from metarec.rl import env as E
    from metarec.rl import simulator as S

    sim = S.synthetic_simulator(0, 16, 4, 10, env_config=E.EnvConfig(horizon=4, history_len=2), mf_steps=10)
    net = networks.make_item_scorer(10, 2, 8, 16)
    trainers = {"ppo": ppo.make_trainer(ppo.PPOConfig(num_updates=7, num_envs=4), net),
                "dqn": dqn.make_trainer(dqn.DQNConfig(num_iterations=7, num_envs=2, buffer_size=64, batch_size=8), net),
                "metasgd": maml.make_meta_trainer(maml.MetaRLConfig(num_iterations=7, meta_batch=2, inner_steps=1,
                                                                    query_episodes=2, meta_sgd=True), net)}  # fmt: skip
    for name, t in trainers.items():
        init = jax.jit(t.init)
        run = jax.jit(t.run, static_argnames="length")
        one, m_one = run(init(jax.random.PRNGKey(1), sim.train), sim.train, 0, 7)
        out = loop.train_checkpointed(run, lambda: init(jax.random.PRNGKey(1), sim.train), sim.train, 7, every=3)
        assert tree_digest(out.state) == tree_digest(one), name
        for k, v in m_one.items():
            np.testing.assert_array_equal(out.metrics[k], np.asarray(v), err_msg=f"{name}/{k}")


@pytest.mark.slow  # ~3-4 min on 2 cores
def test_full_benchmark_killed_mid_meta_training_resumes_bit_identically(tmp_path, tmp_path_factory):
    """All trained methods (PPO, DQN with its replay buffer, MAML, FOMAML, Meta-SGD), bandits and the
    online loop; killed while Meta-SGD trains: finished units are read back (PPO is restored for
    nothing), Meta-SGD continues from its checkpoint, and the online loop uses its final state."""
    env = _cache_env(tmp_path_factory)
    args = ["--seeds=0", "--methods=random,linucb,ppo,dqn,maml,fomaml,metasgd", "--ppo_updates=6",
            "--dqn_iterations=6", "--meta_iterations=30", "--meta_batch=4", "--inner_steps=1", *TINY[:-2],
            "--online_rounds=2", "--checkpoint_every=2"]  # fmt: skip
    resumed_units, killed_at = _kill_resume_compare(
        tmp_path, env, args, "checkpoints/seed0/metasgd", 2, 30,
        [f"seed0/{u}" for u in ("ppo", "dqn", "maml", "fomaml")])  # fmt: skip
    assert resumed_units == ["ppo", "dqn", "maml", "fomaml", f"metasgd@{killed_at[-1]}"]
