"""The meta-RL experiment's run bookkeeping: config.json / run.json / rl_results.json metadata,
metrics rows, progress, non-finite-loss stops; its configs and their checks against the
registries."""

from __future__ import annotations

import io
import json
import os
import types

import numpy as np
import pytest

from experiments.meta_rl import pipeline, runner, settings
from experiments.meta_rl.configs import default, quick, slate
from experiments.tune.configs import meta_rl_slate
from metarec import data as mdata
from metarec.training.runlog import read_json, read_metrics
from metarec.training.trainer import NonFiniteLossError
from tests.conftest import write_ml100k


def _tiny_config(**kw):
    c = default.get_config()
    c.dataset, c.seeds, c.methods = "synthetic", (0, 1), ("random", "popular")
    c.n_train_users, c.n_test_users, c.n_items = 8, 4, 8
    c.env.horizon, c.env.history_len = 3, 2
    c.adapt_episodes, c.eval_episodes = (0, 1), 1
    c.update(kw)
    return c


def _fake_run_seeds(spec, hooks, ctx=None):
    """Stands in for ``runner.run_seeds`` (whose jitted evaluation takes ~20 s to compile): calls
    the hooks the way the real one does and returns a payload of the same shape."""
    per_seed = []
    for seed in spec.seeds:
        sim = types.SimpleNamespace(
            train={"a": np.arange(3) + seed},
            test={"b": np.ones(2)},
            item_ids=np.arange(4),
            popularity=np.ones(4),
        )
        hooks.on_simulator(seed, sim)
        for name in spec.methods:
            hooks.on_stage(seed, f"eval_{name}", 0.1)
            curve = {
                m: {n: 0.1 * (seed + 1) + n for n in spec.adapt_episodes}
                for m in ("ctr", "return", "regret")
            }
            hooks.on_method(seed, name, curve)
        per_seed.append({"seed": seed, "timings": {}, "oracle": {}, "train_logs": {}})
    return {"results": {name: {} for name in spec.methods}, "per_seed": per_seed}


def _check_run_files(wd, res, run):
    for d in (res, run):
        assert d["command"].endswith(f"--workdir {wd}") and d["seeds"] == [0, 1]
        assert d["config"]["methods"] == ["random", "popular"]
        assert d["config"]["env"]["horizon"] == 3 and d["config"]["data_dir"] is None
        assert "checkpoint_every" not in d["config"]
        assert {"jax", "numpy", "python"} <= set(d["versions"])
        assert d["data_sha256"] is None  # synthetic: the simulators are digested instead
        assert set(d["simulator_sha256"]) == {"0", "1"}
    assert res["simulator_sha256"]["0"] != res["simulator_sha256"]["1"]
    saved = read_json(os.path.join(wd, "config.json"))["config"]
    inner = settings.recorded_config(settings.resolve(default.get_config()))["meta"]["inner_params"]
    assert saved["env.horizon"] == 3 and saved["meta.inner_params"] == inner  # the tuned choice


def test_meta_rl_writes_run_metadata_metrics_and_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_seeds", _fake_run_seeds)
    wd = str(tmp_path / "rl")
    bar = io.StringIO()
    argv = ["-m", "experiments.meta_rl.main", "--config.dataset=synthetic", "--workdir", wd]
    pipeline.run(_tiny_config(), wd, argv=argv, progress_stream=bar)
    res = read_json(os.path.join(wd, "rl_results.json"))
    _check_run_files(wd, res, read_json(os.path.join(wd, "run.json")))
    rows = [r for r in read_metrics(wd) if r["kind"] == "eval"]
    assert sorted((r["unit"], r["step"]) for r in rows) == sorted(
        (f"seed{s}/{m}", n) for s in (0, 1) for m in ("random", "popular") for n in (0, 1)
    )
    one = next(r for r in rows if r["unit"] == "seed1/popular" and r["step"] == 1)
    assert one["ctr"] == pytest.approx(1.2) and {"return", "regret"} <= set(one)
    assert "meta_rl 4/4" in bar.getvalue()


def test_meta_rl_data_sha256_of_movielens(tmp_path):
    d = write_ml100k(tmp_path / "ml", n_users=20, n_items=15)
    spec = settings.resolve(_tiny_config(dataset="ml-100k", data_dir=str(d)))
    expected = mdata.data_checksum(mdata.load_dataset("ml-100k", data_dir=d))
    assert pipeline.data_sha256(spec) == expected


@pytest.mark.slow  # over 5 s per call in the default suite; CI runs `make test-slow` too
def test_meta_rl_real_pipeline_on_tiny_synthetic_config(tmp_path):
    wd = str(tmp_path / "rl")
    bar = io.StringIO()
    argv = ["-m", "experiments.meta_rl.main", "--config.dataset=synthetic", "--workdir", wd]
    payload = pipeline.run(_tiny_config(), wd, argv=argv, progress_stream=bar)
    res = read_json(os.path.join(wd, "rl_results.json"))
    run = read_json(os.path.join(wd, "run.json"))
    _check_run_files(wd, res, run)
    assert all(len(v) == 64 for v in run["simulator_sha256"].values())
    assert set(res["results"]) == {"random", "popular"} and res == json.loads(json.dumps(payload))
    rows = [r for r in read_metrics(wd) if r["kind"] == "eval"]
    assert len(rows) == 8 and all({"ctr", "return", "regret"} <= set(r) for r in rows)
    # the metrics rows average to the reported results
    mean = np.mean([r["ctr"] for r in rows if r["unit"].endswith("/random") and r["step"] == 0])
    assert mean == pytest.approx(res["results"]["random"]["ctr"]["0"]["mean"])
    assert "meta_rl 4/4" in bar.getvalue()
    assert "±" in pipeline.format_table(payload)


@pytest.mark.slow  # over 5 s per call in the default suite; CI runs `make test-slow` too
def test_meta_rl_slates_report_ndcg_end_to_end(tmp_path):
    c = _tiny_config(methods=("random", "linucb"))
    c.env.slate_size, c.env.examine_decay = 2, 0.8
    payload = pipeline.run(c, str(tmp_path), argv=[], progress_stream=io.StringIO())
    assert runner.metrics_of(settings.resolve(c)) == runner.METRICS + ("ndcg",)
    for res in payload["results"].values():
        assert set(res) == set(runner.METRICS) | {"ndcg"}
        assert all(0 <= v["mean"] <= 1 for v in res["ndcg"].values())
    rows = [r for r in read_metrics(str(tmp_path)) if r["kind"] == "eval"]
    assert all("ndcg" in r for r in rows)
    assert "ndcg" in pipeline.format_table(payload, "ndcg")


def test_slate_configs_are_checked():
    spec = settings.resolve(slate.get_config())
    assert spec.env.slate_size == 5 and "dqn" not in spec.methods
    assert spec.env.horizon * spec.env.slate_size <= spec.n_items
    tune = meta_rl_slate.get_config()  # the slate tune stage searches the slate simulator
    assert tune.write_config == slate.TUNED and tune.base.env.slate_size == 5
    c = _tiny_config()
    c.env.slate_size = 3  # 3 slates of 3 > 8 items
    with pytest.raises(ValueError, match="shows more items than the catalogue's"):
        settings.resolve(c)
    c = _tiny_config(methods=("linucb", "dqn"))
    c.env.slate_size = 2
    with pytest.raises(ValueError, match="--config.methods: dqn cannot rank slates"):
        settings.resolve(c)


def test_table_of_one_seed_shows_no_spread():
    cell = {"mean": 0.5, "std": 0.0}
    payload = {
        "results": {"ppo": {"ctr": {"0": cell, "1": cell}}},
        "oracle_ctr": cell,
        "per_seed": [{"seed": 0}],
    }
    table = pipeline.format_table(payload)
    assert "0.5000" in table and "oracle" in table and "±" not in table


def test_meta_rl_non_finite_training_loss_names_method_and_seed(tmp_path):
    pipeline.check_finite_training(0, "ppo", {"loss": np.ones(3), "return": np.zeros(3)})
    with pytest.raises(
        NonFiniteLossError,
        match=r"seed 2, method metasgd: non-finite training loss .*iteration 3 of 4",
    ):
        pipeline.check_finite_training(2, "metasgd", {"loss": np.array([1.0, 0.5, np.nan, np.inf])})
    spec = settings.resolve(_tiny_config())
    rec = pipeline.RunRecorder(spec, str(tmp_path), progress_stream=io.StringIO())
    rec.on_train(0, "dqn", {"loss": np.array([1.0, 0.5]), "epsilon": np.array([1.0, 0.9])})
    with pytest.raises(NonFiniteLossError, match="seed 1, method dqn"):
        rec.on_train(1, "dqn", {"loss": np.array([np.inf])})
    rec.close()
    rows = read_metrics(str(tmp_path))
    assert [(r["unit"], r["step"], r["loss"]) for r in rows] == [
        ("seed0/dqn/train", 1, 1.0),
        ("seed0/dqn/train", 2, 0.5),
    ]


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("methods", ("ppo", "maml2"), "--config.methods='maml2'; allowed: random, popular, "),
        ("methods", (), "--config.methods is empty; allowed: random, popular, "),
        ("dataset", "ml-25m", "--config.dataset='ml-25m'; allowed: synthetic, ml-100k, ml-1m"),
        ("reward", "stars", "--config.reward='stars'; allowed: click, rating"),
        ("seeds", ("a",), "--config.seeds must be integers"),
        ("adapt_episodes", (-1,), "--config.adapt_episodes must be non-negative integers"),
        ("eval_episodes", 0, "--config.eval_episodes must be >= 1"),
        ("checkpoint_every", 0, "--config.checkpoint_every must be >= 1"),
    ],
)
def test_bad_config_is_named_with_the_allowed_values(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        settings.resolve(_tiny_config(**{field: value}))


def test_library_settings_are_checked_and_names_split():
    c = _tiny_config(methods=("ppo,maml", "metasgd"))
    c.meta.inner_params = "item_bias,user/bias"
    spec = settings.resolve(c)
    assert spec.methods == ("ppo", "maml", "metasgd")
    assert spec.meta.inner_params == ("item_bias", "user/bias")
    c.meta.inner_params = "all"
    assert settings.resolve(c).meta.inner_params is None
    c.ppo.num_envs = 0
    with pytest.raises(ValueError, match="PPOConfig.num_envs must be >= 1"):
        settings.resolve(c)
    c = _tiny_config()
    c.meta.inner_credit = "bogus"
    with pytest.raises(ValueError, match="inner_credit"):
        settings.resolve(c)


def test_quick_config_is_the_default_with_small_sizes():
    full = settings.recorded_config(settings.resolve(default.get_config()))
    small = settings.recorded_config(settings.resolve(quick.get_config()))
    assert full["methods"] == list(settings.METHODS) and full["seeds"] == [0, 1, 2]
    assert full["online_rounds"] == 5
    changed = {k for k in pipeline.flat(full) if pipeline.flat(full)[k] != pipeline.flat(small)[k]}
    assert changed == {
        "n_train_users",
        "n_test_users",
        "n_items",
        "env.horizon",
        "env.history_len",
        "adapt_episodes",
        "eval_episodes",
        "ppo.num_updates",
        "ppo.num_envs",
        "dqn.num_iterations",
        "dqn.num_envs",
        "dqn.buffer_size",
        "dqn.batch_size",
        "meta.num_iterations",
        "meta.meta_batch",
        "metabandit.num_iterations",
        "metabandit.meta_batch",
        "rl2.num_iterations",
        "rl2.meta_batch",
        "online_rounds",
    }
