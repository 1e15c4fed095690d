"""End-to-end cold-start experiment on a small fixture dataset: structure of results.json
(PROTOCOL.md), seeded determinism, config validation, and a tuning stage that never reads a test
scenario."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pandas as pd
import pytest

from experiments.coldstart import build, pipeline, tables
from experiments.coldstart.configs import default as default_config
from experiments.tune import noise
from experiments.tune import pipeline as tune
from experiments.tune.pipeline import grid_search
from metarec import data as mdata
from metarec import stats
from metarec.baselines.mf import DEFAULT_REG
from metarec.baselines.neighbours import new_item_features
from metarec.data.encode import new_item_mask


def tiny_config():
    cfg = default_config.base_config()
    cfg.seeds = (0, 1)
    cfg.algos = ("maml",)
    cfg.baselines = ("global_mean", "user_mean", "item_mean", "no_adapt", "finetune")
    cfg.epochs = 2
    cfg.finetune_epochs = 1
    cfg.finetune_lrs = (0.05,)
    cfg.meta_batch = 8
    cfg.embed_dim = 4
    cfg.hidden = (8,)
    cfg.inner_steps = 2
    cfg.eval_chunk = 32
    cfg.adaptation_curves = False  # covered by the report tests; saves four eval compilations here
    # the fixture's users rate 14-60 items: the new-item stand-in (users with 13 ratings of the
    # held-out items, tuning path only) needs half the items held out
    cfg.val_new_items = 0.5
    cfg.seed_workers = 1  # in this process; the worker processes have a test of their own
    return cfg


@pytest.fixture(scope="module")
def tiny_run(fixture_data):
    data, _ = fixture_data
    cfg = tiny_config()
    compiled = build.Compiled(cfg)
    return cfg, compiled, pipeline.run(cfg, data=data, log_fn=lambda m: None, compiled=compiled)


def test_run_writes_protocol_format(tiny_run):
    cfg, _, res = tiny_run
    assert res["dataset"] == "ml-100k" and res["protocol"] == "melu" and res["seeds"] == [0, 1]
    assert set(res["scenarios"]) >= set(build.TEST_SCENARIOS)
    for s in build.TEST_SCENARIOS:
        methods = res["results"][s]
        expected = {
            "random",
            "maml",
            "global_mean",
            "user_mean",
            "item_mean",
            "no_adapt",
            "finetune",
        }
        assert set(methods) == expected
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
    table = pipeline.format_table(res)
    assert "user_item_cold" in table and "± " in table
    assert "step_scale" not in res["training"]["0"]  # MAML learns no rates: nothing to calibrate
    one_seed = res | {"seeds": [0]}
    assert "± " not in pipeline.format_table(one_seed).split("\n", 1)[1]  # no spread for one seed
    # the header names each MeLU learner's own inner step size, a method's override included
    methods = res["config"]["methods"] | {"maml": {"algo": "maml", "inner_lr": 0.125}}
    config = res["config"] | {"methods": methods, "inner_lr": 0.5}
    assert pipeline.format_table(res | {"config": config}).splitlines()[1].endswith("lr maml 0.125")
    # a method with a new-item scale of its own says so beside its per-seed scales
    training = {k: v | {"step_scale": {"maml": 0.25}} for k, v in res["training"].items()}
    config = res["config"] | {"methods": {"maml": {"algo": "maml", "new_item_step_scale": 0.5}}}
    table = pipeline.format_table(res | {"config": config, "training": training})
    assert "(per seed): maml x 0.25/0.25, new items x 0.5\n" in table


def test_run_is_deterministic(fixture_data, tiny_run):
    data, _ = fixture_data
    cfg, compiled, res = tiny_run
    again = pipeline.run_seed(data, 1, cfg, log_fn=lambda m: None, compiled=compiled)
    for s in build.TEST_SCENARIOS:
        assert again[s] == res["per_seed"]["1"][s]


def test_learner_order_leaves_the_results_unchanged(fixture_data):
    """A seed worker starts at another meta-learner (``run_seed(start=...)``): each learner's
    keys, parameters and scores, and the order they are recorded in, are those of config order."""
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.algos = ("maml", "fomaml")
    cfg.baselines = ("no_adapt",)
    cfg.epochs = 1
    compiled = build.Compiled(cfg)
    runs, logs = [], []
    for start in (0, 1):
        lines = []
        runs.append(pipeline.run_seed(data, 1, cfg, lines.append, compiled, start=start))
        logs.append([line.split(":")[0] for line in lines if line.startswith("seed 1 ")])
    assert logs[0][0] == "seed 1 maml" and logs[1][0] == "seed 1 fomaml"
    for s in build.TEST_SCENARIOS:
        assert runs[1][s] == runs[0][s] and list(runs[1][s]) == list(runs[0][s])
    for field in ("params_sha256", "best_epoch"):
        assert runs[1]["_info"][field] == runs[0]["_info"][field], field
    assert list(runs[1]["_info"]["params_sha256"]) == list(runs[0]["_info"]["params_sha256"])

    def untimed(histories):  # every epoch record but its wall-clock seconds
        return {
            u: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
            for u, h in histories.items()
        }

    assert untimed(runs[1]["_info"]["histories"]) == untimed(runs[0]["_info"]["histories"])


@pytest.mark.slow  # spawns two processes that compile every program again
def test_seeds_in_worker_processes_give_the_same_run(fixture_data, tiny_run, tmp_path):
    data, _ = fixture_data
    _, _, res = tiny_run  # one seed after another, in this process
    cfg = tiny_config()
    cfg.seed_workers = 2
    assert build.seed_workers(cfg, 2) == 2 and build.seed_workers(cfg, 1) == 1
    lines = []
    par = pipeline.run(cfg, data=data, log_fn=lines.append, workdir=str(tmp_path))
    assert par["per_seed"] == res["per_seed"] and par["per_user"] == res["per_user"]
    for seed in ("0", "1"):
        for field in ("params_sha256", "best_epoch", "n_fit_ratings", "finetune_lr"):
            assert par["training"][seed][field] == res["training"][seed][field], (seed, field)
    # each seed's epochs reached this process's log, its units and metrics its workdir
    with open(tmp_path / "metrics.jsonl") as f:
        units = {json.loads(line)["unit"] for line in f}
    for seed in (0, 1):
        assert any(line.startswith(f"  seed{seed}/maml epoch") for line in lines)
        assert os.path.exists(pipeline.unit_paths(str(tmp_path), seed, "finetune")[1])
        assert {f"seed{seed}/maml", f"seed{seed}/finetune"} <= units


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("algos", ("mamal",), "--config.algos: unknown ['mamal']; allowed: maml, fomaml, reptile"),
        ("algos", ("maml,metasgd,maml",), "--config.algos lists ['maml'] more than once"),
        ("baselines", ("svd",), "--config.baselines: unknown ['svd']; allowed: global_mean"),
        ("adapt", "some", "--config.adapt='some' for model melu; allowed: decision, all, head"),
        ("model", "gpt", "--config.model='gpt'; allowed: melu, hybrid, transformer"),
        (
            "train_tasks",
            "all",
            "--config.train_tasks='all'; allowed: resample, resample_support, crossfit, fixed, "
            "resample_chrono, crossfit_chrono",
        ),
        ("crossfit_folds", 0, "--config.crossfit_folds must be >= 1, got 0"),
        ("dataset", "ml-7m", "ml-7m"),
        ("meta_lr", 0.0, "--config.meta_lr must be > 0"),
        ("seeds", (), "--config.seeds must name at least one seed"),
        ("seed_workers", 0, "--config.seed_workers must be >= 1, got 0"),
        ("finetune_lrs", (), "--config.finetune_lrs=(); allowed: one or more step sizes >= 0"),
        ("finetune_lrs", (0.1, -1.0), "--config.finetune_lrs=(0.1, -1.0); allowed: one or more"),
        (
            "new_item_step_scale",
            -0.5,
            "--config.new_item_step_scale must be -1 (one scale for every item) or >= 0, got -0.5",
        ),
    ],
)
def test_bad_config_is_named(field, value, message):
    cfg = default_config.get_config()
    cfg[field] = value
    with pytest.raises(ValueError) as e:
        build.validate_config(cfg)
    assert message in str(e.value)


def test_comma_lists_from_the_command_line_are_split():
    cfg = default_config.get_config()
    cfg.algos = ("maml,metasgd",)
    build.validate_config(cfg)
    assert cfg.algos == ("maml", "metasgd")


def test_script_rejects_bad_config_in_one_line():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.coldstart.main",
            "--config.algos=mamal",
            "--workdir=/tmp/never",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == [
        "coldstart: error: --config.algos: unknown ['mamal']; allowed: maml, fomaml, reptile, "
        "metasgd, imaml, cf_metasgd"
    ]


def _poison(data: mdata.RatingsData, keep: np.ndarray) -> mdata.RatingsData:
    """``data`` with every rating outside ``keep`` (a bool mask over rows) mirrored (r -> 6 - r)."""
    r = data.ratings.copy()
    r.loc[~keep, "rating"] = (6.0 - r.loc[~keep, "rating"]).astype(r["rating"].dtype)
    return dataclasses.replace(data, ratings=r)


def _test_query_pairs(data: mdata.RatingsData, seeds, protocol: str = "melu") -> set:
    """(user, item) of every query rating of a test scenario under any of ``seeds``."""
    pairs = set()
    for seed in seeds:
        split = mdata.make_split(data, seed, protocol)
        for name in mdata.SCENARIOS:
            pairs |= _query_pairs(split.sets[name])
    return pairs


def test_tuning_never_reads_a_test_scenario(fixture_data):
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.epochs = 1
    with pytest.raises(ValueError, match="unknown config field 'inner_rate'"):
        grid_search(cfg, {"inner_rate": [0.1]}, algo="fomaml", data=data)
    grid = {"inner_lr": [0.0001, 0.05]}

    def search(d):
        return grid_search(cfg, grid, algo="fomaml", seeds=(0,), data=d, log_fn=lambda m: None)

    rows = search(data)
    assert len(rows) == 2 and all(
        np.isfinite(r["val_mae"]) and r["best_epochs"] == [1] for r in rows
    )
    # every rating outside the training ratings (all test scenarios: new users, new items, warm_test
    # users; support and query sets alike) poisoned: the tuning output does not move
    split = mdata.make_split(data, 0, cfg.protocol)
    train_pairs = set(zip(split.train_ratings["user_id"], split.train_ratings["item_id"]))
    pairs = zip(data.ratings["user_id"], data.ratings["item_id"])
    in_train = np.array([p in train_pairs for p in pairs])
    assert 0 < (~in_train).sum() < len(in_train)
    assert search(_poison(data, in_train)) == rows
    # structurally too: the tuning path encodes no test task
    tuning_seed = build.prepare_seed(data, 0, cfg, test=False)
    assert tuning_seed.test == {} and tuning_seed.test_sets == {}
    # the same poison on the validation users' ratings does move it: the check can fail
    val_users = set(build.prepare_seed(data, 0, cfg).val_sets.user_id.tolist())
    not_val = ~data.ratings["user_id"].isin(val_users).to_numpy()
    assert search(_poison(data, not_val)) != rows


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_cf_method_runs_with_paired_tests_against_the_best_baseline(fixture_data):
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.algos = ("cf_metasgd",)
    cfg.baselines = ("user_mean", "item_mean", "mf")
    cfg.recommended = "cf_metasgd"
    res = pipeline.run(cfg, data=data, log_fn=lambda m: None)
    for s in build.TEST_SCENARIOS:
        c = res["paired"][s]["mae"]
        means = {b: res["results"][s][b]["mae"]["mean"] for b in cfg.baselines}
        assert c["baseline"] == min(means, key=means.get)
        # users pooled over both seeds; the pooled mean is the user-weighted mean of the seeds'
        n = [res["training"][str(seed)]["n_users"][s] for seed in (0, 1)]
        assert c["n"] == sum(n)
        per_seed = [res["per_seed"][str(seed)][s]["cf_metasgd"]["mae"] for seed in (0, 1)]
        assert c["mean_a"] == pytest.approx(np.dot(per_seed, n) / sum(n), abs=1e-6)
        lo, hi = c["ci95"]
        assert lo <= c["mean_diff"] <= hi and 0 <= c["wilcoxon_p"] <= 1
    assert "paired per-user comparison" in pipeline.format_table(res)
    # the learned rates scaled by a scale of the grid, chosen on the validation users, per seed
    for seed in ("0", "1"):
        assert res["training"][seed]["step_scale"]["cf_metasgd"] in cfg.step_scales
    assert "learned inner rates scaled by the validation users' choice" in pipeline.format_table(
        res
    )
    # the same training ratings for every method, and more training tasks than fixed splits
    info = res["training"]["0"]
    assert info["n_train_task_users"] > info["n_train_users"]
    sd = build.prepare_seed(data, 0, cfg)
    assert info["n_fit_ratings"] == len(sd.fit_ratings) < len(sd.split.train_ratings)


def test_method_fields_are_checked():
    cfg = default_config.base_config()
    cfg.methods.cf_metasgd.adapt = "decision"
    cfg.algos = ("cf_metasgd",)
    with pytest.raises(ValueError, match="method cf_metasgd .metasgd.: --config.adapt='decision'"):
        build.validate_config(cfg)
    cfg = default_config.base_config()
    cfg.methods = {"x": {"algo": "sgd"}}
    cfg.algos = ("x",)
    with pytest.raises(ValueError, match="--config.methods.x.algo='sgd'; allowed: maml"):
        build.validate_config(cfg)


def test_the_tuned_file_sets_methods_and_the_recommended_one(tmp_path):
    path = tmp_path / "tuned.json"
    entry = {"algo": "metasgd", "model": "hybrid", "adapt": "user", "cf_hidden": [64]}
    path.write_text(json.dumps({"methods": {"cf_metasgd": entry}, "recommended": "cf_metasgd"}))
    cfg = default_config.apply_tuned(default_config.base_config(), str(path))
    assert cfg.recommended == "cf_metasgd" and cfg.methods.cf_metasgd.cf_hidden == (64,)
    algo, mcfg = build.method_config(cfg, "cf_metasgd")
    assert algo == "metasgd" and mcfg.model == "hybrid" and mcfg.cf_hidden == (64,)
    assert cfg.model == "melu"  # the base config is untouched


def test_the_main_job_trains_its_meta_learners_as_the_tune_stage_scores_them():
    from experiments.coldstart.configs import time as time_config
    from experiments.tune.configs import default as tune_default
    from experiments.tune.configs import time as tune_time

    for stage, main in (
        (tune_default.get_config(), default_config.get_config()),
        (tune_time.get_config(), time_config.get_config()),
    ):
        assert (stage.base.epochs, stage.base.patience) == (main.epochs, main.patience)
        # fine-tuning, a baseline, keeps its own budget in the main job
        assert (main.finetune_epochs, main.finetune_patience) == (30, 8)


def test_fine_tuning_stops_at_its_own_patience(monkeypatch):
    from experiments.coldstart import finetune

    seen = {}

    def fake_meta_train(*args, **kw):
        seen["cfg"] = args[6]

    class Fns:
        mesh = None

        def model(self, spec):
            return (lambda k: {}), None

        def learner(self, spec, algo, **kw):
            return None

        step = eval = learner

    class Sd:
        encoder = types.SimpleNamespace(spec=None)
        val = ()

        def train_tasks(self, mode):
            return []

    monkeypatch.setattr(finetune, "meta_train", fake_meta_train)
    monkeypatch.setattr(finetune, "pooled_tasks", lambda tasks: tasks)
    cfg = default_config.get_config()
    cfg.finetune_epochs, cfg.finetune_patience = 7, 3
    finetune.trainer(Fns(), Sd(), cfg, None, None, 1.0)()
    assert (seen["cfg"].epochs, seen["cfg"].patience) == (7, 3)
    assert (cfg.epochs, cfg.patience) == (20, 4)  # the meta-learners' budget is left alone


def test_the_time_protocol_has_a_tune_stage_of_its_own(tmp_path, monkeypatch):
    from experiments.coldstart.configs import time as time_config
    from experiments.tune.configs import default as tune_default
    from experiments.tune.configs import time as tune_time

    melu, stage = tune_default.get_config(), tune_time.get_config()
    assert stage.base.protocol == "time" and stage.write_config == time_config.TUNED
    assert stage.write_config != melu.write_config
    # the melu stage's search on the time split: the protocol, the warm start and the time
    # protocol's chronological tasks among the meta-training task choices differ
    differs = {k for k, v in stage.to_dict().items() if v != melu.to_dict()[k]}
    assert differs == {"base", "write_config", "warm_starts", "spaces"}
    chrono = dict(melu.spaces.cf_metasgd)
    chrono["train_tasks"] += ",crossfit_chrono"
    assert stage.spaces.to_dict() == melu.spaces.to_dict() | {"cf_metasgd": chrono}
    # its stand-ins shifted in time; in both, no rating of the validation users is fitted
    assert not melu.base.val_support_in_fit
    latest = {"protocol": "time", "val_hold_out": "latest"}
    assert stage.base.to_dict() == melu.base.to_dict() | latest
    assert set(stage.warm_starts.cf_metasgd) == set(stage.spaces.cf_metasgd)
    # the evaluation config reads the time stage's file, the melu one only while it is missing
    path = tmp_path / "tuned_time.json"
    monkeypatch.setattr(time_config, "TUNED", str(path))
    melu_methods = default_config.get_config().methods.to_dict()
    assert time_config.get_config().methods.to_dict() == melu_methods
    path.write_text(json.dumps({"methods": {"maml": {"inner_lr": 0.3}}, "recommended": "maml"}))
    cfg = time_config.get_config()
    assert cfg.protocol == "time" and cfg.recommended == "maml" and cfg.methods.maml.inner_lr == 0.3


def test_the_time_stage_compares_its_task_modes_at_its_chosen_point():
    from experiments.coldstart.configs import time as time_config
    from experiments.tune.configs import time as tune_time
    from experiments.tune.configs import time_tasks
    from experiments.tune.spaces import make_study, parse_space

    search, stage = tune_time.get_config(), time_tasks.get_config()
    differs = {k for k, v in stage.to_dict().items() if v != search.to_dict()[k]}
    assert differs == {"spaces", "warm_starts"} and not stage.warm_starts
    point = time_tasks.SEARCH_POINT
    assert set(stage.spaces) == set(search.spaces) == set(point)
    modes = parse_space(dict(search.spaces.cf_metasgd), stage.base)["train_tasks"][1]
    for method, space in stage.spaces.items():
        assert set(space) == set(search.spaces[method]) == set(point[method])
        parsed = parse_space(dict(space), stage.base)
        study, n_trials = make_study(parsed, stage.n_trials, stage.sampler_seed)
        # a grid: one trial per meta-training mode of the search, one per MeLU learner
        assert n_trials == (len(modes) if method == "cf_metasgd" else 1)
        for field, (kind, values) in parsed.items():
            if field == "train_tasks" and method == "cf_metasgd":
                assert values == modes and point[method][field] in modes
            else:  # fixed at the search's point, every float to the last bit
                assert kind == "choice" and values == (point[method][field],)
                assert type(values[0]) is type(point[method][field])
    # the committed file comes from this grid: its point apart from the mode and what the
    # stage's last step (new_item_scale.py) grids, new items' own blend
    from experiments.tune.configs import new_item_scale

    with open(time_config.TUNED) as f:
        tuned = json.load(f)["methods"]
    for method, fields in point.items():
        for field, value in fields.items():
            if field not in (
                "train_tasks",
                new_item_scale.OWN,
                new_item_scale.CONTENT,
                new_item_scale.FIELD,
            ):
                assert tuned[method][field] == value, (method, field)


@pytest.mark.parametrize("stage", ["melu", "time"])
def test_the_new_item_scale_step_is_a_grid_at_the_stage_s_point(stage):
    from experiments.tune.configs import new_item_scale
    from experiments.tune.spaces import make_study, parse_space

    c = new_item_scale.get_config(stage)
    search = new_item_scale.STAGES[stage].get_config()
    differs = {k for k, v in c.to_dict().items() if v != search.to_dict()[k]}
    assert differs == {"spaces", "warm_starts"} and not c.warm_starts
    with open(c.write_config) as f:
        written = json.load(f)["methods"]
    values = (-1.0, *c.base.step_scales)
    # with the kNN blend the content feature is gridded, and new items' own blend where the
    # point has none (the content feature needs it)
    point = written["cf_metasgd"]
    assert point["cf_knn"]
    both = {"cf_knn_new_content", "cf_knn_new_own"}
    last = {"new_item_step_scale", "cf_knn_new_content"}  # in the search's space too (melu)
    gridded = last | (set() if point["cf_knn_new_own"] else {"cf_knn_new_own"})
    for method, space in c.spaces.items():
        assert set(space) - last == set(search.spaces[method]) - last
        parsed = parse_space(dict(space), c.base)
        _, n_trials = make_study(parsed, c.n_trials, c.sampler_seed)
        # a grid: one trial per scale and new-item blend, one per MeLU learner
        n_blends = 2 ** len(gridded & both)
        assert n_trials == (len(values) * n_blends if method == "cf_metasgd" else 1)
        for field, (kind, got) in parsed.items():
            if field == "new_item_step_scale":
                assert got == values
            elif field in gridded:
                assert got == (False, True)
            else:  # fixed at the point the stage wrote, every float to the last bit
                assert kind == "choice" and got == (written[method][field],)
                assert type(got[0]) is type(written[method][field])
    # what the step wrote: one of its scales (the file before the step has none)
    assert written["cf_metasgd"].get("new_item_step_scale", -1.0) in values
    with pytest.raises(ValueError, match="allowed: melu, time"):
        new_item_scale.get_config("melu2")


def _assert_grid_at_written_point(step, stage: str, grid: dict, also=()):
    """``step.get_config(stage)`` differs from its stage's search only in its spaces and warm
    starts: cf_metasgd's fields of ``grid`` (field -> values) take those values, and every other
    field (the search's, and those of ``also`` a method's entry has) is fixed as the stage's file
    has it, to the last bit. Returns the step's config."""
    from experiments.tune.configs.new_item_scale import STAGES
    from experiments.tune.spaces import make_study, parse_space

    c, search = step.get_config(stage), STAGES[stage].get_config()
    differs = {k for k, v in c.to_dict().items() if v != search.to_dict()[k]}
    assert differs == {"spaces", "warm_starts"} and not c.warm_starts
    with open(c.write_config) as f:
        written = json.load(f)["methods"]
    for method, space in c.spaces.items():
        gridded = grid if method == "cf_metasgd" else {}
        added = set(also) & set(written[method])
        assert set(space) == set(search.spaces[method]) | set(gridded) | added
        parsed = parse_space(dict(space), c.base)
        _, n_trials = make_study(parsed, c.n_trials, c.sampler_seed)
        assert n_trials == np.prod([len(v) for v in gridded.values()], dtype=int)
        for field, (kind, got) in parsed.items():
            if field in gridded:
                assert got == tuple(gridded[field])
            else:
                assert kind == "choice" and got == (written[method][field],)
                assert type(got[0]) is type(written[method][field])
    with pytest.raises(ValueError, match="allowed: melu, time"):
        step.get_config("melu2")
    return c


@pytest.mark.parametrize("stage", ["melu", "time"])
def test_the_early_stopping_step_is_a_grid_of_the_weight_at_the_stage_s_point(stage):
    from experiments.tune.configs import early_stop

    c = _assert_grid_at_written_point(early_stop, stage, {early_stop.FIELD: (0.0, 1.0)})
    # 0 (MAE alone) is the config's value, so the file before the step stops as it always did
    assert c.base.early_stop_ndcg_weight == 0.0


@pytest.mark.parametrize("stage", ["melu", "time"])
def test_the_budget_step_is_a_grid_of_cf_metasgd_s_budget_at_the_stage_s_point(stage):
    from experiments.tune.configs import budget, early_stop

    grid = {"epochs": budget.EPOCHS, "patience": budget.PATIENCE}
    c = _assert_grid_at_written_point(budget, stage, grid, also=(early_stop.FIELD,))
    # the earlier step's field, outside the search space, is fixed as the file has it
    assert early_stop.FIELD in c.spaces["cf_metasgd"]
    # the base budget every earlier trial trained with is one of the grid's points
    assert c.base.epochs in budget.EPOCHS and c.base.patience in budget.PATIENCE


@pytest.mark.parametrize("stage", ["melu", "time"])
def test_the_mf_feature_step_is_a_grid_of_the_flag_at_the_stage_s_point(stage):
    from experiments.tune.configs import mf_feature

    grid = {mf_feature.FIELD: (False, True)}
    c = _assert_grid_at_written_point(mf_feature, stage, grid, also=mf_feature.EARLIER)
    # the earlier steps' fields outside the search space are fixed as the file has them
    with open(c.write_config) as f:
        written = json.load(f)["methods"]["cf_metasgd"]
    assert {f for f in mf_feature.EARLIER if f in written} <= set(c.spaces["cf_metasgd"])
    if stage == "time":  # its budget step wrote cf_metasgd's own epochs and patience
        assert {"epochs", "patience"} <= set(c.spaces["cf_metasgd"])


@pytest.mark.slow  # over 6 s in the default suite (2026-12-07); CI runs `make test-slow` too
def test_new_items_adapt_at_their_own_scale(fixture_data):
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.seeds = (0,)
    cfg.algos = ("metasgd",)
    cfg.baselines = ("no_adapt",)
    cfg.step_scales = (1.0,)
    one = pipeline.run_seed(data, 0, cfg, log_fn=lambda m: None)
    cfg.new_item_step_scale = 0.0  # new items: the initialisation, not adapted
    cfg.adaptation_curves, cfg.curve_steps, cfg.curve_support = True, (cfg.inner_steps,), ()
    new = pipeline.run_seed(data, 0, cfg, log_fn=lambda m: None)
    tasks = build.prepare_seed(data, 0, cfg).test
    all_new = 0
    for s in build.TEST_SCENARIOS:
        has_new = new_item_mask(tasks[s].query.x).any(axis=1)
        if has_new.all():  # every user's query is new items: predicted as not adapted
            all_new += 1
            assert new[s]["metasgd"]["mae"] == pytest.approx(new[s]["no_adapt"]["mae"], abs=1e-6)
            assert one[s]["metasgd"]["mae"] != pytest.approx(one[s]["no_adapt"]["mae"], abs=1e-4)
        # the adaptation curve at the trained number of steps predicts new items as the results do
        curve = new["_info"]["adaptation"]["steps"][s][str(cfg.inner_steps)]
        assert curve == pytest.approx(new[s]["metasgd"]["mae"], abs=1e-6)
        # a user without a new item in the query set is scored as before, to the last bit
        known = [
            [v for v, n in zip(run["_info"]["per_user"][s]["metasgd"]["mae"], has_new) if not n]
            for run in (one, new)
        ]
        assert known[0] == known[1]
    assert all_new == 2  # item_cold and user_item_cold


@pytest.mark.slow  # about 25 s: six meta-trainings; CI runs `make test-slow` too
def test_points_differing_only_in_the_new_item_scale_share_one_meta_training(
    fixture_data, monkeypatch
):
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.epochs = 1
    cfg.val_new_model = "separate"  # as the tune stages run: two models per seed
    cfg.methods.cf_metasgd.update(cf_knn_new_own=True, cf_knn_mf=True, step_scales=(0.5, 1.0))
    _, prepared = tune.prepare(cfg, (0,), data)
    calls = []
    train = tune.meta_train
    monkeypatch.setattr(tune, "meta_train", lambda *a, **k: calls.append(1) or train(*a, **k))
    tune._trained.clear()

    def point(scale, content=False):
        p = {"new_item_step_scale": scale, "cf_knn_new_content": content}
        row = tune.evaluate_point(cfg, "cf_metasgd", p, data, prepared)
        return {k: v for k, v in row.items() if k != "per_user"}

    half = point(0.5)
    zero = point(0.0)
    assert len(calls) == 2  # the warm users' model and the new-item stand-in's, once each
    assert zero["val_new_mae"] != half["val_new_mae"]  # the scale acts on the new items
    assert zero["val_mae"] == half["val_mae"]  # the warm validation users' query items are known
    content = point(0.0, True)  # the content feature changes training: a model of its own
    assert len(calls) == 4 and content["val_new_mae"] != zero["val_new_mae"]
    tune._trained.clear()  # retrained from scratch: the same numbers as the reused training
    assert point(0.0) == zero and len(calls) == 6
    tune._trained.clear()


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
@pytest.mark.parametrize("new_model", ["shared", "separate"])
def test_optuna_selection_never_reads_a_test_scenario(fixture_data, new_model):
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.epochs = 1
    cfg.val_new_model = new_model
    cfg.val_support_in_fit = new_model == "shared"  # the tune stages' "separate" holds them out
    spaces = {"cf_metasgd": {"inner_lr": "log:0.05:1.0", "loss_prior": "float:0:50"}}

    compared = ("methods", "validation", "recommended", "trials", "baselines_validation")

    def select(d, keys=compared):
        out = tune.select(
            cfg, spaces, seeds=(0,), n_trials=2, new_item_weight=0.5, data=d, log_fn=lambda m: None
        )
        return {k: out[k] for k in keys}

    first = select(data, keys=(*compared, "per_user"))
    # the per-user records rebuild every trial's logged objective (the selection-noise input)
    trials, cells = noise.cells(
        first.pop("per_user")["cf_metasgd"], {"val": 0.5, "val_new": 0.5}, 3
    )
    logged = {r["trial"]: r["objective"] for r in first["trials"]["cf_metasgd"]}
    rebuilt = stats.cell_objectives(cells)
    np.testing.assert_allclose(rebuilt, [logged[t] for t in trials], atol=1e-5)
    assert first["recommended"] == "cf_metasgd" and len(first["trials"]["cf_metasgd"]) == 2
    v = first["validation"]["cf_metasgd"]
    assert v["objective"] == pytest.approx(
        0.5 * (v["val_mae"] - v["val_ndcg@3"]) + 0.5 * (v["val_new_mae"] - v["val_new_ndcg@3"])
    )
    assert first["methods"]["cf_metasgd"]["model"] == "hybrid"
    split = mdata.make_split(data, 0, cfg.protocol)
    train_pairs = set(zip(split.train_ratings["user_id"], split.train_ratings["item_id"]))
    pairs = zip(data.ratings["user_id"], data.ratings["item_id"])
    in_train = np.array([p in train_pairs for p in pairs])
    assert select(_poison(data, in_train)) == first
    val_users = set(build.prepare_seed(data, 0, cfg).val_sets.user_id.tolist())
    not_val = ~data.ratings["user_id"].isin(val_users).to_numpy()
    assert select(_poison(data, not_val)) != first


@pytest.mark.slow  # spawns two worker processes that compile every program again
def test_a_selection_with_the_seeds_in_worker_processes_is_the_same(fixture_data, monkeypatch):
    """The tune stage's seeds prepared and trained in worker processes (``seed_workers``): the
    same trials, scores, per-user records and baselines as one process, bit for bit."""
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.epochs = 1
    cfg.val_new_model = "separate"
    spaces = {"cf_metasgd": {"inner_lr": "log:0.05:1.0"}, "maml": {"inner_lr": "choice:0.01,0.3"}}

    def select(workers):
        cfg.seed_workers = workers
        out = tune.select(
            cfg, spaces, seeds=(0, 1), n_trials=2, new_item_weight=0.5, data=data, log_fn=print
        )
        return json.dumps(out, default=lambda a: np.asarray(a).tolist())

    calls, group_map = [], tune.SeedWorkers.map

    def counted(self, fn, *args):
        calls.append(fn.__name__)
        return group_map(self, fn, *args)

    monkeypatch.setattr(tune.SeedWorkers, "map", counted)
    one = select(1)
    assert '"recommended"' in one and '"per_user_baselines"' in one and not calls
    assert select(2) == one
    # every trial (2 + 2) and the baselines ran in the workers
    assert calls == ["_has_cold"] + ["_score_seed"] * 4 + ["_baselines_seed"]


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_a_sealed_selection_over_two_seeds_reads_no_test_query_of_either(fixture_data):
    """One config chosen on seeds 0 and 1 with ``val_seal_seeds``: poisoning every query rating
    of either seed's test scenarios, and every rating neither seed trains on, leaves the output
    the same (the other seed's test users' support ratings are training ratings, as allowed)."""
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.epochs = 1
    cfg.val_new_model = "separate"
    cfg.val_seal_seeds = (0, 1)
    spaces = {"cf_metasgd": {"inner_lr": "log:0.05:1.0"}}

    def select(d):
        out = tune.select(
            cfg,
            spaces,
            seeds=(0, 1),
            n_trials=2,
            new_item_weight=0.5,
            data=d,
            log_fn=lambda m: None,
        )
        keys = ("methods", "validation", "recommended", "trials", "baselines_validation")
        return {k: out[k] for k in keys}

    pairs = list(zip(data.ratings["user_id"], data.ratings["item_id"]))
    trained = set().union(*(_pairs(mdata.make_split(data, s).train_ratings) for s in (0, 1)))
    queried = _test_query_pairs(data, (0, 1))
    keep = np.array([p in trained and p not in queried for p in pairs])
    assert (~keep & np.array([p in trained for p in pairs])).any()
    assert select(_poison(data, keep)) == select(data)


def test_search_tries_the_configured_point_then_the_warm_start(monkeypatch):
    cfg = default_config.base_config()
    space = {"inner_lr": "log:0.05:1.0", "train_tasks": "choice:resample_support,crossfit"}
    seen = []

    def scored(cfg, method, point, data, prepared):  # no training: the objective is inner_lr
        seen.append(dict(point))
        row = {"val_mae": point["inner_lr"], "val_ndcg@3": 0.0, "val_new_mae": 0.0}
        return row | {"val_new_ndcg@3": 0.0, "val_mae_per_seed": [], "best_epochs": []}

    monkeypatch.setattr(tune, "evaluate_point", scored)
    kw = dict(method="cf_metasgd", n_trials=4, prepared={0: None}, log_fn=lambda m: None)
    warm = {"inner_lr": 0.07, "train_tasks": "crossfit"}
    rows = tune.search(cfg, space, warm_start=warm, **kw)
    _, mcfg = build.method_config(cfg, "cf_metasgd")
    assert seen[0]["train_tasks"] == mcfg.train_tasks and seen[1] == warm and len(seen) == 4
    assert rows[0]["objective"] == min(p["inner_lr"] for p in seen) <= 0.07
    with pytest.raises(ValueError, match=r"warm_starts.cf_metasgd: \['cf_dim'\] not in the"):
        tune.search(cfg, space, warm_start={"cf_dim": 8}, **kw)


def test_search_spaces_are_parsed_or_refused():
    cfg = default_config.base_config()
    got = tune.parse_space({"inner_lr": "log:0.01:1", "cf_hidden": "choice:none,64,32/16"}, cfg)
    assert got == {"inner_lr": ("log", (0.01, 1.0)), "cf_hidden": ("choice", ((), (64,), (32, 16)))}
    with pytest.raises(ValueError, match="--config.space.inner_lr='log:0:1'; allowed"):
        tune.parse_space({"inner_lr": "log:0:1"}, cfg)
    with pytest.raises(ValueError, match="not a field of the tuned experiment"):
        tune.parse_space({"inner_rate": "log:0.1:1"}, cfg)


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_neighbour_view_and_deployed_tables(fixture_data):
    """cf_knn tasks carry the kNN baselines' predictions (validation: over every training rating,
    training tasks: over the item tables' ratings); the deployed model reads MF tables refitted on
    every training rating and keeps what was meta-learned."""
    data, _ = fixture_data
    cfg = tiny_config()
    _, mcfg = build.method_config(cfg, "cf_metasgd")
    mcfg.cf_knn, mcfg.train_tasks = True, "resample_support"
    sd = build.prepare_seed(data, 0, cfg)
    v = sd.view(mcfg)
    assert v is sd.view(mcfg) and sd.view(cfg) is sd  # cached; a method without cf_knn: as is
    vs = sd.val_sets
    for j, name in enumerate(("user_knn", "item_knn")):
        b = build.make_baseline(name, clip=False)
        st = b.fit(*(sd.fit_ratings[c].to_numpy() for c in ("user_id", "item_id", "rating")))
        want = b.predict(
            st,
            vs.support_item,
            vs.support_rating,
            vs.support_mask,
            vs.query_item,
            vs.query_mask,
            vs.user_id,
        )
        got = v.val.query.x["nbr"][..., j]
        np.testing.assert_allclose(got * vs.query_mask, np.asarray(want) * vs.query_mask, atol=1e-4)
    assert v.train_tasks("resample_support")(1).support.x["nbr"].shape[-1] == 2
    init_fn, _ = build.Compiled(mcfg).model(sd.encoder.spec)
    import jax

    p0 = tables.initial_params(init_fn, jax.random.PRNGKey(0), sd, mcfg, 0)
    p0 = p0 | {"global_bias": p0["global_bias"] + 0.25}  # as if meta-learned
    dp = tables.deployed(sd, mcfg, 0)(p0)
    full = tables.item_tables(sd, mcfg, 0, sd.fit_ratings)
    ref = build.get_model("hybrid").with_item_tables(p0, *full)
    np.testing.assert_allclose(dp["item_factors"]["embedding"], ref["item_factors"]["embedding"])
    assert not np.allclose(dp["item_bias"]["embedding"], p0["item_bias"]["embedding"])
    assert dp["global_bias"] == p0["global_bias"]
    mcfg.train_tasks = "resample"  # tables already fitted on every training rating
    assert tables.deployed(sd, mcfg, 0)(p0) is p0
    # cf_knn_mf: a third column, the mf baseline's prediction as the pipeline fits it (seeded by
    # the seed), for validation users over every training rating; the model blends 3 features
    mcfg.cf_knn_mf = True
    w = sd.view(mcfg)
    assert w is not v and w is sd.view(mcfg)
    (want,) = build.baseline_predictions("mf", 0, sd.fit_ratings, {"val": vs}).values()
    got = w.val.query.x["nbr"][..., 2]
    # the baseline clips to the rating scale; the feature is unclipped
    np.testing.assert_allclose(np.clip(got, 1, 5) * vs.query_mask, want * vs.query_mask, atol=1e-4)
    np.testing.assert_array_equal(w.val.query.x["nbr"][..., :2], v.val.query.x["nbr"])
    assert w.train_tasks("resample")(1).support.x["nbr"].shape[-1] == 3

    def blends_three(view, weights):  # the model starts each blend weight at 1/4 and runs
        init_fn, apply_fn = build.Compiled(mcfg).model(sd.encoder.spec)
        p = init_fn(jax.random.PRNGKey(0))
        np.testing.assert_allclose(p[weights], [0.25] * 3)
        out = apply_fn(p, jax.tree_util.tree_map(lambda a: a[0], view.val.query.x))
        assert np.isfinite(np.asarray(out)).all()

    blends_three(w, "nbr_weight")
    # cf_knn_new_own: every example also carries its features as if its item were new, over the
    # same ratings; the known features are unchanged and new items get their own weights
    mcfg.cf_knn_new_own = True
    n = sd.view(mcfg)
    assert n is not w and n is sd.view(mcfg)
    np.testing.assert_array_equal(n.val.query.x["nbr"], w.val.query.x["nbr"])
    triples = [sd.fit_ratings[c].to_numpy() for c in ("user_id", "item_id", "rating")]
    mf = (build.make_baseline("mf", seed=0).fit(*triples), DEFAULT_REG)
    want = new_item_features(
        build.fit_neighbours(*triples),
        vs.support_item,
        vs.support_rating,
        vs.support_mask,
        vs.query_item,
        mf,
    )
    m = vs.query_mask[..., None]
    np.testing.assert_allclose(n.val.query.x["nbr_new"] * m, want * m, atol=1e-5)
    assert n.train_tasks("resample")(1).support.x["nbr_new"].shape[-1] == 3
    blends_three(n, "nbr_weight_new")
    mcfg.cf_knn_new_own = False
    mcfg.cf_knn = False  # cf_knn_mf alone changes nothing (as cf_knn_new_items)
    build.validate_config(mcfg)
    assert sd.view(mcfg) is sd
    assert "nbr_weight" not in build.Compiled(mcfg).model(sd.encoder.spec)[0](jax.random.PRNGKey(0))


def _pairs(frame) -> set:
    return set(zip(frame["user_id"].tolist(), frame["item_id"].tolist()))


def _query_pairs(sets: mdata.UserSets) -> set:
    return {
        (int(u), int(i))
        for u, items, mask in zip(sets.user_id, sets.query_item, sets.query_mask)
        for i, m in zip(items, mask)
        if m
    }


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
@pytest.mark.parametrize("mode", ["crossfit", "crossfit_chrono"])
def test_crossfit_epochs_query_ratings_unseen_by_their_features_and_tables(fixture_data, mode):
    """Cross-fitting: epoch e queries fold (e - 1) % K's held-out ratings, and its kNN/MF
    features and frozen item tables are fitted on exactly the training ratings minus those (no
    training query rating is in its own features); "crossfit"'s fold 0 is resample_support's;
    the folds' query sets differ."""
    data, _ = fixture_data
    cfg = tiny_config()
    _, mcfg = build.method_config(cfg, "cf_metasgd")
    mcfg.cf_knn, mcfg.cf_knn_mf, mcfg.cf_freeze_tables = True, True, True
    mcfg.train_tasks, mcfg.crossfit_folds = mode, 3
    build.validate_config(mcfg)
    sd = build.prepare_seed(data, 0, mcfg)
    folds = sd.fold_ratings[mode]
    assert len(folds) == 3
    if mode == "crossfit":
        np.testing.assert_array_equal(
            sd.draws[mode](1).query_item, sd.draws["resample_support"](1).query_item
        )
        pd.testing.assert_frame_equal(folds[0], sd.table_ratings["resample_support"])
    fit, queries = _pairs(sd.fit_ratings), []
    for e in (1, 2, 3, 4):
        f = sd.fold_of(mode, e)
        assert f == (e - 1) % 3 and sd.fold_of("resample_support", e) == 0
        q = _query_pairs(sd.draws[mode](e))
        assert q and fit - _pairs(folds[f]) == q
        queries.append(q)
    assert queries[3] == queries[0] and len({frozenset(q) for q in queries}) == 3

    v = sd.view(mcfg)
    for e in (1, 2, 3):
        draw = sd.draws[mode](e)
        got = v.train_tasks(mode)(e).query.x["nbr"]
        for f in range(3):
            want = sd._neighbour_encoder(folds[f], True)(draw).query.x["nbr"]
            assert np.array_equal(got, want) == (f == sd.fold_of(mode, e))

    init_fn, _ = build.Compiled(mcfg).model(sd.encoder.spec)
    p0 = tables.initial_params(init_fn, jax.random.PRNGKey(0), sd, mcfg, 0)
    p0 = p0 | {"global_bias": p0["global_bias"] + 0.25}  # as if meta-learned
    swap = tables.fold_tables(sd, mcfg, 0)
    fill = build.get_model("hybrid").with_item_tables
    for e in (1, 2, 3):
        got = swap(e, p0)
        fold = folds[sd.fold_of(mode, e)]
        want = fill(p0, *tables.item_tables(sd, mcfg, 0, fold))
        for name in ("item_factors", "item_bias"):
            np.testing.assert_array_equal(got[name]["embedding"], want[name]["embedding"])
        assert got["global_bias"] == p0["global_bias"]
        same = np.array_equal(got["item_bias"]["embedding"], p0["item_bias"]["embedding"])
        assert same == (e == 1)  # the initial tables are fold 0's
    mcfg.train_tasks = "resample_support"
    assert tables.fold_tables(sd, mcfg, 0) is None
    mcfg.train_tasks, mcfg.cf_freeze_tables = mode, False
    with pytest.raises(ValueError, match="must stay frozen: set --config.cf_freeze_tables=True"):
        build.validate_config(mcfg)


@pytest.mark.parametrize("support", ["new", "known"])
def test_new_item_validation_scores_items_held_out_of_training(fixture_data, support):
    """Selection's stand-in for the item-cold scenarios (tuning path only): a seeded fraction of
    the items loses every training rating, so they are out of vocabulary for every method;
    training users are scored on their ratings of those items, after adapting on other ratings
    of held-out items ("new", built by the protocol's rule as item_cold is) or on their known
    items ("known"); the kNN features are the baselines' own predictions for them."""
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.val_new_support = support
    sd = build.prepare_seed(data, 0, cfg, test=False)
    new_sets = sd.val_new_sets
    held = np.unique(new_sets.query_item[new_sets.query_mask > 0])
    assert new_sets.n_users > 0 and len(held) > 0
    assert not sd.fit_ratings["item_id"].isin(held).any()  # nobody's ratings of them trained on
    assert set(new_sets.user_id) - set(sd.val_sets.user_id)  # training users are scored too
    for sets in (sd.val_sets, sd.train_sets, sd.draws["resample"](1)):
        for prefix in ("support", "query"):
            m = getattr(sets, f"{prefix}_mask") > 0
            assert not np.isin(getattr(sets, f"{prefix}_item")[m], held).any()
    sup = new_sets.support_item[new_sets.support_mask > 0]
    if support == "new":  # support and query alike: ratings of held-out items, as in item_cold
        trained = sd.fit_ratings["item_id"].unique()
        assert not np.isin(sup, trained).any()
        n = new_sets.support_mask.sum(1) + new_sets.query_mask.sum(1)
        assert (n >= 13).all() and (new_sets.query_mask.sum(1) == 10).all()
        truth = {(u, i): r for u, i, r in data.ratings[["user_id", "item_id", "rating"]].values}
        for prefix in ("support", "query"):
            m = getattr(new_sets, f"{prefix}_mask") > 0
            users = np.repeat(new_sets.user_id, m.sum(1))
            got = zip(users, getattr(new_sets, f"{prefix}_item")[m])
            np.testing.assert_array_equal(
                [truth[p] for p in got], getattr(new_sets, f"{prefix}_rating")[m]
            )
    else:  # adapt on known items
        assert np.isin(sup, sd.fit_ratings["item_id"].unique()).all()
    # the held items are out of vocabulary (row 0), their content kept
    real = new_sets.query_mask > 0
    np.testing.assert_array_equal(sd.val_new.query.x["item"][..., 1][real], 0)
    assert (sd.val_new.query.x["genres"].sum(-1)[real] > 0).any()
    # the same rule as the test scenarios: evaluation trains on every item, no new-item set
    full = build.prepare_seed(data, 0, cfg)
    assert full.val_new is None and full.val_new_sets is None
    assert full.fit_ratings["item_id"].isin(held).any()
    assert len(full.fit_ratings) > len(sd.fit_ratings)
    _, mcfg = build.method_config(cfg, "cf_metasgd")
    mcfg.cf_knn = True
    v = sd.view(mcfg)
    vs = new_sets.pad_support(sd.width)
    for j, name in enumerate(("user_knn", "item_knn")):
        b = build.make_baseline(name, clip=False)
        st = b.fit(*(sd.fit_ratings[c].to_numpy() for c in ("user_id", "item_id", "rating")))
        args = (vs.support_item, vs.support_rating, vs.support_mask, vs.query_item)
        want = np.asarray(b.predict(st, *args, vs.query_mask, vs.user_id)) * vs.query_mask
        got = v.val_new.query.x["nbr"][..., j] * vs.query_mask
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_selection_objective_weighs_the_new_item_validation():
    row = {"val_mae": 0.8, "val_ndcg@3": 0.7, "val_new_mae": 0.9, "val_new_ndcg@3": 0.6}
    assert tune.selection_objective(row, 3, 1.0) == pytest.approx(0.1)
    assert tune.selection_objective(row, 3, 1.0, 0.5) == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)
    assert tune.selection_objective(row, 3, 0.0, 1.0) == pytest.approx(0.9)
