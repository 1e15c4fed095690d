"""Checkpoints and resume: orbax round trip (NamedTuple params/opt state, PRNG keys), retention of the
last N + best, resumable sampler, bit-identical resume after a crash (in process) and after SIGKILL
of the real script (subprocess, slow), non-finite loss handling, metrics de-duplication on resume."""

from __future__ import annotations

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
import pytest

from metarec.training import checkpoint as ckpt
from metarec import coldstart
from metarec import data as mdata
from metarec.meta import MetaSGDParams
from metarec.training.runlog import MetricsWriter, read_metrics
from tests.conftest import write_ml100k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- pieces
def test_epoch_order_depends_only_on_seed_and_epoch():
    a = ckpt.epoch_order(7, 3, 50)
    np.testing.assert_array_equal(a, ckpt.epoch_order(7, 3, 50))
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, ckpt.epoch_order(7, 4, 50))
    assert not np.array_equal(a, ckpt.epoch_order(8, 3, 50))


def test_tree_digest_sees_one_bit():
    t = {"a": jnp.arange(4.0), "b": (jnp.ones((2, 2), jnp.int32),)}
    d = ckpt.tree_digest(t)
    assert d == ckpt.tree_digest(jax.tree_util.tree_map(lambda x: x + 0, t))
    flipped = np.asarray(t["a"]).copy().view(np.uint32)
    flipped[2] ^= 1
    assert ckpt.tree_digest({"a": flipped.view(np.float32), "b": t["b"]}) != d
    assert ckpt.tree_digest({"a": t["a"].astype(jnp.float16), "b": t["b"]}) != d  # dtype counts


def _state(seed):
    k = jax.random.PRNGKey(seed)
    params = MetaSGDParams({"w": jax.random.normal(k, (3, 2)), "b": jnp.zeros(2)}, {"w": jnp.full((3, 2), 0.1), "b": jnp.ones(2)})
    opt_state = optax.adamw(1e-2, weight_decay=1e-4).init(params)
    return {"params": params, "opt_state": opt_state, "key": jax.random.split(k)[0]}


def test_checkpointer_round_trip_and_retention(tmp_path):
    with ckpt.Checkpointer(str(tmp_path / "c"), keep_last=2, keep_best=1) as ck:
        assert ck.latest_step() is None and ck.best_step() is None
        metrics = {1: None, 2: 0.9, 3: 0.7, 4: None, 5: 0.7, 6: 0.8, 7: None}
        for step, m in metrics.items():
            ck.save(step, _state(step), {"epoch": step, "losses": [0.1, 1 / 3]}, metric=m)
        # newest two (6, 7) + best by metric (0.7 at steps 3 and 5: the earlier wins)
        assert ck.all_steps() == [3, 6, 7]
        assert ck.latest_step() == 7 and ck.best_step() == 3
        like = _state(0)
        st, meta = ck.restore(3, like)
        assert meta["epoch"] == 3 and meta["losses"] == [0.1, 1 / 3] and meta["metric"] == 0.7
        assert isinstance(st["params"], MetaSGDParams)
        assert type(st["opt_state"][0]) is type(like["opt_state"][0])
        assert ckpt.tree_digest(st) == ckpt.tree_digest(_state(3))
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 4; available: \[3, 6, 7\]"):
            ck.restore(4, like)
    # reopening finds the same steps; params of the best checkpoint for research use
    p = ckpt.restore_latest_params(str(tmp_path / "c"), _state(0)["params"])
    assert ckpt.tree_digest(p) == ckpt.tree_digest(_state(3)["params"])


def test_typed_prng_key_round_trip(tmp_path):
    state = {"w": jnp.ones(3), "key": jax.random.key(5)}
    with ckpt.Checkpointer(str(tmp_path / "k")) as ck:
        ck.save(1, state, {})
        st, _ = ck.restore(1, {"w": jnp.zeros(3), "key": jax.random.key(0)})
    np.testing.assert_array_equal(jax.random.key_data(st["key"]), jax.random.key_data(state["key"]))
    np.testing.assert_array_equal(jax.random.uniform(st["key"], (3,)), jax.random.uniform(state["key"], (3,)))


def test_restore_into_wrong_structure_is_a_clear_error(tmp_path):
    with ckpt.Checkpointer(str(tmp_path / "x")) as ck:
        ck.save(1, {"params": {"w": jnp.ones(3)}}, {})
        with pytest.raises(ValueError, match="does not match the model being trained"):
            ck.restore(1, {"params": {"w": jnp.ones(3), "v": jnp.ones(2)}})


# ---------------------------------------------------------------- meta_train resume (in process)
def _cfg():
    cfg = coldstart.default_config()
    cfg.embed_dim, cfg.hidden, cfg.inner_steps, cfg.meta_batch = 4, [8], 2, 8
    cfg.epochs, cfg.patience, cfg.ckpt_every, cfg.log_every, cfg.eval_chunk = 3, 3, 6, 1, 32
    return cfg


@pytest.fixture(scope="module")
def setup():
    tasks, spec, _ = mdata.make_synthetic_tasks(seed=3, n_users=44, n_items=40, n_support=6, n_query=4)
    train, val = mdata.index_tasks(tasks, slice(0, 36)), mdata.index_tasks(tasks, slice(36, 44))
    cfg = _cfg()
    fns = coldstart.Compiled(cfg)
    init_fn, _ = fns.model(spec)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(0))
    args = (fns.learner(spec, "maml"), fns.step(spec, "maml"), fns.eval(spec, "maml"), init_fn(k_init), train, val,
            cfg, k_train, (1.0, 5.0))  # fmt: skip
    return args


class Crash(Exception):
    pass


def _crash_after(step, n):
    count = {"n": 0}

    def wrapped(*a):
        count["n"] += 1
        if count["n"] > n:
            raise Crash(f"simulated crash before step {count['n']}")
        return step(*a)

    return wrapped


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_resume_after_crash_is_bit_identical(setup, tmp_path):
    learner, step, *rest = setup
    # uninterrupted reference (4 steps per epoch, 3 epochs; checkpoints at epoch ends 4, 8, 12 and mid-epoch at 6)
    w_ref = MetricsWriter(str(tmp_path / "ref"), tensorboard=False)
    with ckpt.Checkpointer(str(tmp_path / "ref" / "ck")) as ck:
        ref = coldstart.meta_train(learner, step, *rest, checkpointer=ck, metrics=w_ref, unit="u")
    w_ref.close()
    assert ref.steps == 12 and len(ref.history) == 3 and ref.resumed_from is None
    # the same again without checkpoints: bit-identical (determinism, and checkpointing changes nothing)
    again = coldstart.meta_train(learner, step, *rest)
    assert again.params_sha256 == ref.params_sha256 and _strip(again.history) == _strip(ref.history)

    # crash in the middle of epoch 2 (after step 7; newest checkpoint: step 6, mid-epoch), then resume
    w = MetricsWriter(str(tmp_path / "run"), tensorboard=False)
    with ckpt.Checkpointer(str(tmp_path / "run" / "ck")) as ck:
        with pytest.raises(Crash):
            coldstart.meta_train(learner, _crash_after(step, 7), *rest, checkpointer=ck, metrics=w, unit="u")
        assert ck.latest_step() == 6
    with ckpt.Checkpointer(str(tmp_path / "run" / "ck")) as ck:
        res = coldstart.meta_train(learner, step, *rest, checkpointer=ck, resume=True, metrics=w, unit="u")
        final = ck.restore(ck.latest_step(), {"params": res.params, "opt_state": optax.adamw(1e-3).init(res.params),
                                               "key": jax.random.PRNGKey(0)})[1]  # fmt: skip
    w.close()
    assert res.resumed_from == 6
    assert res.params_sha256 == ref.params_sha256
    assert ckpt.tree_digest(res.params) == ckpt.tree_digest(ref.params)
    assert _strip(res.history) == _strip(ref.history)
    assert (res.best_epoch, res.best_val_mae, res.steps) == (ref.best_epoch, ref.best_val_mae, ref.steps)
    assert final["done"] and final["step"] == 12
    # metric records: step 7 was logged before the crash, dropped on resume, logged again once
    key = lambda r: (r["kind"], r["step"])  # noqa: E731
    got, want = sorted(map(key, read_metrics(str(tmp_path / "run")))), sorted(map(key, read_metrics(str(tmp_path / "ref"))))
    assert got == want and len(got) == 12 + 3


def test_resume_of_a_finished_run_trains_nothing(setup, tmp_path):
    learner, step, *rest = setup
    with ckpt.Checkpointer(str(tmp_path / "ck")) as ck:
        ref = coldstart.meta_train(learner, step, *rest, checkpointer=ck)
    with ckpt.Checkpointer(str(tmp_path / "ck")) as ck:
        res = coldstart.meta_train(learner, _crash_after(step, 0), *rest, checkpointer=ck, resume=True)
    assert res.params_sha256 == ref.params_sha256 and _strip(res.history) == _strip(ref.history)


def test_non_finite_loss_stops_naming_step_and_keeps_last_good_checkpoint(setup, tmp_path):
    learner, step, *rest = setup

    def poisoned(*a):  # the real step, but from step 5 on it reports a non-finite loss (and, like the
        p, s, m = step(*a)  # real guard, returns the old state)
        poisoned.n += 1
        if poisoned.n >= 5:
            return a[0], a[1], m | {"finite": jnp.array(False), "loss": jnp.array(jnp.nan)}
        return p, s, m

    poisoned.n = 0
    with ckpt.Checkpointer(str(tmp_path / "ck")) as ck:
        with pytest.raises(coldstart.NonFiniteLossError) as e:
            coldstart.meta_train(learner, poisoned, *rest, checkpointer=ck, unit="seed0/maml")
        assert ck.latest_step() == 4  # epoch 1's end; nothing saved after the bad step
    msg = str(e.value)
    assert "seed0/maml: non-finite meta-loss or gradient at step 5 (epoch 2, batch 1/4" in msg
    assert "last good checkpoint (step 4)" in msg and "--resume" in msg and str(tmp_path / "ck") in msg
    assert e.value.step == 5 and e.value.last_good_step == 4
    # ... and resuming from it with a healthy step finishes exactly like a run that never failed
    with ckpt.Checkpointer(str(tmp_path / "ck")) as ck:
        res = coldstart.meta_train(learner, step, *rest, checkpointer=ck, resume=True)
    ref = coldstart.meta_train(learner, step, *rest)
    assert res.params_sha256 == ref.params_sha256


def test_resume_refuses_checkpoint_of_another_split(setup, tmp_path):
    learner, step, eval_fn, init, train, val, cfg, key, scale = setup
    mp = learner.init(init)
    with ckpt.Checkpointer(str(tmp_path / "ck")) as ck:
        ck.save(3, {"params": mp, "opt_state": coldstart.make_optimizer(cfg).init(mp), "key": key},
                {"sampler_seed": 1, "n_tasks": 999, "meta_batch": 8})  # fmt: skip
        with pytest.raises(ValueError, match="written for another data split or seed"):
            coldstart.meta_train(learner, step, eval_fn, init, train, val, cfg, key, scale, checkpointer=ck, resume=True)


# ---------------------------------------------------------------- the script, killed with SIGKILL
def _script(workdir, data_dir, *extra):
    return [sys.executable, "-m", "experiments.meta_train", f"--data_dir={data_dir}", f"--workdir={workdir}",
            "--seeds=0,1", "--algo=maml,fomaml", "--baselines=global_mean,no_adapt,finetune", "--epochs=3",
            "--patience=3", "--meta_batch=8", "--embed_dim=4", "--hidden=8", "--inner_steps=2", "--ckpt_every=2",
            "--curve_steps=0,2", "--curve_support=3,5", "--noprogress", "--noreport", *extra]  # fmt: skip


def _comparable(res):
    train = {s: {k: v for k, v in info.items() if k not in ("seconds", "resumed")} for s, info in res["training"].items()}
    for info in train.values():
        info["histories"] = {a: _strip(h) for a, h in info["histories"].items()}
    return res["results"], res["per_seed"], train, res.get("adaptation")


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
    data_dir = write_ml100k(tmp_path / "ml-100k", n_users=150, n_items=120, min_per_user=14, max_per_user=60, seed=11)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    out = subprocess.run(_script(ref_dir, data_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]

    proc = subprocess.Popen(_script(run_dir, data_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
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

    again = subprocess.run(_script(run_dir, data_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode != 0 and "pass --resume to continue it" in again.stderr
    resumed = subprocess.run(_script(run_dir, data_dir, "--resume"), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step" in (run_dir / "train_log.txt").read_text()
    ref = json.loads((ref_dir / "results.json").read_text())
    res = json.loads((run_dir / "results.json").read_text())
    assert _comparable(res) == _comparable(ref)
    # a second --resume of the finished run reads every unit back and changes nothing
    third = subprocess.run(_script(run_dir, data_dir, "--resume"), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert third.returncode == 0 and "finished earlier" in third.stdout
    assert _comparable(json.loads((run_dir / "results.json").read_text())) == _comparable(ref)
    for key in ("command", "config", "versions", "data", "seeds"):
        assert key in res
    assert res["data"]["sha256"] and res["versions"]["jax"] == jax.__version__
