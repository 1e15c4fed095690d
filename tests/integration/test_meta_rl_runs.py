"""Run bookkeeping (issue 7) of the pretraining and meta-RL scripts: per-epoch training state and
--resume for pretraining, run.json / metrics.jsonl / progress / non-finite-loss stops for meta-RL."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import jax
import numpy as np
import pytest

from metarec import pretrain as mpre
from metarec.training.checkpoint import Checkpointer, tree_digest
from metarec.models.transformer import EncoderConfig
from metarec.training.runlog import read_json, read_metrics
from tests.conftest import write_ml100k

V, L = 16, 8
ENC = EncoderConfig(num_items=V, max_len=L, width=16, depth=1, heads=2, dropout_rate=0.1)
PCFG = mpre.PretrainConfig(epochs=4, batch_size=16, lr=5e-3, seed=3)


def _script(name: str):
    """``experiments.<name>``. The scripts define flags of the same names on absl's global FLAGS, so
    before importing one, the flags of the other already imported scripts are removed (the functions
    tested here take their settings as arguments, not from FLAGS)."""
    import importlib
    import sys

    from absl import flags

    full = f"experiments.{name}"
    if full not in sys.modules:
        for other in ("experiments.pretrain", "experiments.meta_rl", "experiments.meta_train"):
            if other in sys.modules:
                for f in flags.FLAGS.get_flags_for_module(other):
                    if f.name in flags.FLAGS:
                        delattr(flags.FLAGS, f.name)
    return importlib.import_module(full)


class _Kill(Exception):
    """Stands in for a killed process."""


def _tiny_rl_config(**kw):
    from metarec.rl import benchmark
    from metarec.rl import env as envlib

    env = envlib.EnvConfig(horizon=3, history_len=2)
    base = dict(dataset="synthetic", seeds=(0, 1), methods=("random", "popular"), n_train_users=8, n_test_users=4,
                n_items=8, env=env, adapt_episodes=(0, 1), eval_episodes=1)  # fmt: skip
    return dataclasses.replace(benchmark.BenchmarkConfig(), **(base | kw))


def _fake_benchmark(config, hooks, ctx=None):
    """Stands in for ``benchmark.run_benchmark`` (whose jitted evaluation takes ~20 s to compile): calls
    the hooks the way the real one does and returns a payload of the same shape."""
    import types

    per_seed = []
    for seed in config.seeds:
        hooks.on_simulator(seed, types.SimpleNamespace(train={"a": np.arange(3) + seed}, test={"b": np.ones(2)},
                                                       item_ids=np.arange(4), popularity=np.ones(4)))  # fmt: skip
        for name in config.methods:
            hooks.on_stage(seed, f"eval_{name}", 0.1)
            hooks.on_method(seed, name, {m: {n: 0.1 * (seed + 1) + n for n in config.adapt_episodes}
                                         for m in ("ctr", "return", "regret")})  # fmt: skip
        per_seed.append({"seed": seed, "timings": {}, "oracle": {}, "train_logs": {}})
    return {"results": {name: {} for name in config.methods}, "per_seed": per_seed}


def test_meta_rl_writes_run_metadata_metrics_and_progress(tmp_path, monkeypatch):
    meta_rl = _script("meta_rl")
    from metarec.rl import benchmark

    monkeypatch.setattr(benchmark, "run_benchmark", _fake_benchmark)
    cfg = _tiny_rl_config()
    wd = str(tmp_path / "rl")
    bar = io.StringIO()
    argv = ["-m", "experiments.meta_rl", "--dataset", "synthetic", "--workdir", wd]
    meta_rl.run(cfg, wd, argv=argv, progress_stream=bar)
    res = read_json(os.path.join(wd, "rl_results.json"))
    run = read_json(os.path.join(wd, "run.json"))
    for d in (res, run):
        assert d["command"].endswith(f"--workdir {wd}") and d["seeds"] == [0, 1]
        assert d["config"]["methods"] == ["random", "popular"] and d["config"]["env"]["horizon"] == 3
        assert {"jax", "numpy", "python"} <= set(d["versions"])
        assert d["data_sha256"] is None  # synthetic: the simulators are digested instead
        assert set(d["simulator_sha256"]) == {"0", "1"}
    assert res["simulator_sha256"]["0"] != res["simulator_sha256"]["1"]
    rows = [r for r in read_metrics(wd) if r["kind"] == "eval"]
    assert sorted((r["unit"], r["step"]) for r in rows) == sorted(
        (f"seed{s}/{m}", n) for s in (0, 1) for m in ("random", "popular") for n in (0, 1))
    one = next(r for r in rows if r["unit"] == "seed1/popular" and r["step"] == 1)
    assert one["ctr"] == pytest.approx(1.2) and {"return", "regret"} <= set(one)
    assert "meta_rl 4/4" in bar.getvalue()


def test_meta_rl_data_sha256_of_movielens(tmp_path):
    meta_rl = _script("meta_rl")
    from metarec import data as mdata

    d = write_ml100k(tmp_path / "ml", n_users=20, n_items=15)
    cfg = _tiny_rl_config(dataset="ml-100k", data_dir=d)
    assert meta_rl.data_sha256(cfg) == mdata.data_checksum(mdata.load_dataset("ml-100k", data_dir=d))


@pytest.mark.slow  # ~20-40 s on 2 busy cores: compiling the bandit evaluation
def test_meta_rl_real_pipeline_on_tiny_synthetic_config(tmp_path):
    meta_rl = _script("meta_rl")

    cfg = _tiny_rl_config()
    wd = str(tmp_path / "rl")
    bar = io.StringIO()
    argv = ["-m", "experiments.meta_rl", "--dataset", "synthetic", "--workdir", wd]
    payload = meta_rl.run(cfg, wd, argv=argv, progress_stream=bar)
    res = read_json(os.path.join(wd, "rl_results.json"))
    run = read_json(os.path.join(wd, "run.json"))
    for d in (res, run):
        assert d["command"].endswith(f"--workdir {wd}") and d["seeds"] == [0, 1]
        assert d["config"]["methods"] == ["random", "popular"] and d["config"]["env"]["horizon"] == 3
        assert {"jax", "numpy", "python"} <= set(d["versions"])
        assert d["data_sha256"] is None  # synthetic: the simulators are digested instead
        assert set(d["simulator_sha256"]) == {"0", "1"} and all(len(v) == 64 for v in d["simulator_sha256"].values())
    assert res["simulator_sha256"]["0"] != res["simulator_sha256"]["1"]
    assert set(res["results"]) == {"random", "popular"} and res == json.loads(json.dumps(payload))
    rows = [r for r in read_metrics(wd) if r["kind"] == "eval"]
    assert len(rows) == 8 and all({"ctr", "return", "regret"} <= set(r) for r in rows)
    # the metrics rows average to the reported results
    mean = np.mean([r["ctr"] for r in rows if r["unit"].endswith("/random") and r["step"] == 0])
    assert mean == pytest.approx(res["results"]["random"]["ctr"]["0"]["mean"])
    assert "meta_rl 4/4" in bar.getvalue()


def test_meta_rl_non_finite_training_loss_names_method_and_seed(tmp_path):
    meta_rl = _script("meta_rl")

    meta_rl.check_finite_training(0, "ppo", {"loss": np.ones(3), "return": np.zeros(3)})
    with pytest.raises(meta_rl.NonFiniteLossError, match=r"seed 2, method metasgd: non-finite training loss .*iteration 3 of 4"):
        meta_rl.check_finite_training(2, "metasgd", {"loss": np.array([1.0, 0.5, np.nan, np.inf])})
    rec = meta_rl.RunRecorder(_tiny_rl_config(), str(tmp_path), progress_stream=io.StringIO())
    rec.on_train(0, "dqn", {"loss": np.array([1.0, 0.5]), "epsilon": np.array([1.0, 0.9])})
    with pytest.raises(meta_rl.NonFiniteLossError, match="seed 1, method dqn"):
        rec.on_train(1, "dqn", {"loss": np.array([np.inf])})
    rec.close()
    rows = read_metrics(str(tmp_path))
    assert [(r["unit"], r["step"], r["loss"]) for r in rows] == [("seed0/dqn/train", 1, 1.0), ("seed0/dqn/train", 2, 0.5)]
