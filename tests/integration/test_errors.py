"""User-facing errors of the pipelines and scripts: each names what is wrong (file, line and field;
config field and what is allowed; folder) and a script prints it as ONE line on stderr, exits with
a non-zero status and shows no traceback. Bad data files themselves: tests/unit/data/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.coldstart import build, curves, pipeline
from experiments.coldstart.configs import default as coldstart_config
from experiments.coldstart.configs import time as time_config
from metarec import data as mdata
from metarec.data.tasks import check_finite_tasks
from metarec.meta import make_learner
from metarec.training.workdir import check_resume, config_diff, is_mutable
from tests.conftest import load_ml100k, write_ml100k

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- scenarios, tasks
def test_empty_scenarios_after_filtering(tmp_path):
    # every user has at most 12 ratings: no scenario keeps anyone under the 13..100 rule
    data = load_ml100k(
        write_ml100k(tmp_path / "s", n_users=40, n_items=60, min_per_user=5, max_per_user=12)
    )
    with pytest.raises(
        ValueError,
        match=r"scenario\(s\) \['warm_train', 'warm_test', 'user_cold', 'item_cold', "
        r"'user_item_cold'\] are empty after filtering for ml-100k / protocol melu / seed 0 "
        r"\(each user needs 13\.\.100 ratings",
    ):
        build.prepare_seed(data, 0, coldstart_config.get_config())


def test_support_smaller_than_requested():
    sets = mdata.UserSets(
        user_id=np.array([7, 8]),
        support_item=np.array([[1, 2, 3], [4, 5, 0]]),
        support_rating=np.array([[3.0, 4, 5], [1, 2, 0]], np.float32),
        support_mask=np.array([[1.0, 1, 1], [1, 1, 0]], np.float32),
        support_time=np.zeros((2, 3), np.int64),
        query_item=np.array([[9], [9]]),
        query_rating=np.ones((2, 1), np.float32),
        query_mask=np.ones((2, 1), np.float32),
        query_time=np.zeros((2, 1), np.int64),
    )
    with pytest.raises(
        ValueError,
        match=r"scenario user_cold: user 8 has 2 support ratings, fewer than the requested 3 "
        r"\(1 of 2 users are short; smallest support set 2\)",
    ):
        curves.subsample_support(sets, 3, scenario="user_cold")
    out = curves.subsample_support(sets, 3, strict=False)
    assert out.user_id.tolist() == [7]
    cut = curves.subsample_support(sets, 1)
    np.testing.assert_array_equal(cut.support_mask, [[1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(cut.support_rating, [[3, 0, 0], [1, 0, 0]])
    assert cut.support_item.shape == sets.support_item.shape


@pytest.mark.parametrize("where,value", [("offset", np.nan), ("genres", np.inf), ("y", -np.inf)])
def test_non_finite_features_are_named(where, value):
    tasks, _, _ = mdata.make_synthetic_tasks(seed=0, n_users=5, n_items=30, n_support=4, n_query=3)
    if where == "y":
        tasks.support.y[3, 2] = value
        field = r"support\.y"
    else:
        tasks.query.x[where][3, 2, ...] = value
        field = rf"query\.x\['{where}'\]"
    n = 1 if where != "genres" else tasks.query.x["genres"].shape[-1]
    with pytest.raises(
        ValueError,
        match=rf"training tasks: {n} non-finite value\(s\) \(NaN/inf\) in {field} \(first at "
        rf"index \(3, 2.*\), user {int(tasks.user[3])}",
    ):
        check_finite_tasks(tasks, "training tasks")


# ---------------------------------------------------------------- config, names, workdir
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("algos", ("maml", "maml"), r"--config\.algos lists \['maml'\] more than once"),
        ("seeds", (-1,), "--config.seeds must be distinct non-negative integers"),
        ("ckpt_every", -1, "--config.ckpt_every must be >= 0"),
        ("keep_checkpoints", 0, "--config.keep_checkpoints must be >= 1"),
        (
            "curve_support",
            (0, 5),
            r"--config\.curve_support values must be integers >= 1, got \(0, 5\)",
        ),
        ("patience", 0, "--config.patience must be >= 1"),
        ("finetune_patience", 0, "--config.finetune_patience must be >= 1"),
        ("val_fraction", 1.0, r"--config\.val_fraction must be in \(0, 1\)"),
        ("id_dropout", 1.0, r"--config\.id_dropout must be in \[0, 1\)"),
        ("cf_new_item_mean", -0.1, r"--config\.cf_new_item_mean must be in \[0, 1\]"),
        ("early_stop_ndcg_weight", -1.0, r"--config\.early_stop_ndcg_weight must be >= 0"),
    ],
)
def test_bad_config_values(field, value, message):
    cfg = coldstart_config.get_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=message):
        build.validate_config(cfg)


def test_all_devices_needs_chunks_that_split_over_the_devices(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "device_count", lambda: 4)
    cfg = coldstart_config.get_config()
    cfg.all_devices, cfg.meta_batch, cfg.chunk_size = True, 32, 6
    with pytest.raises(ValueError, match=r"chunk_size=6 must be a multiple of the 4 devices"):
        build.validate_config(cfg)
    cfg.chunk_size, cfg.meta_batch = 8, 30
    with pytest.raises(ValueError, match=r"meta_batch=30 must be a multiple of the 4 devices"):
        build.validate_config(cfg)
    cfg.meta_batch = 32
    build.validate_config(cfg)


def test_unknown_algorithm_lists_valid_ones():
    cfg = coldstart_config.get_config()
    with pytest.raises(ValueError, match=r"unknown meta-learner 'mamal'; allowed: maml, fomaml"):
        build.build_learner("mamal", lambda p, x: x, cfg)
    with pytest.raises(ValueError, match=r"unknown meta-learner 'mamal'; allowed: maml, fomaml"):
        make_learner("mamal", lambda p, x: x)
    cfg.algos = ("mamal",)
    with pytest.raises(ValueError, match=r"--config\.algos: unknown \['mamal'\]; allowed: maml"):
        build.validate_config(cfg)


def test_unseen_years_is_named():
    cfg = coldstart_config.get_config()
    cfg.unseen_years = "latest"
    with pytest.raises(ValueError, match=r"--config\.unseen_years='latest'; allowed: nearest, oov"):
        build.validate_config(cfg)


def test_workdir_rules(tmp_path):
    def check(cfg, resume, sha="abc", log_fn=lambda m: None):
        return check_resume(
            wd,
            cfg.to_dict(),
            resume=resume,
            mutable=pipeline.RESUME_MUTABLE,
            data_sha256=sha,
            log_fn=log_fn,
        )

    cfg = coldstart_config.get_config()
    wd = str(tmp_path / "run")
    assert check(cfg, resume=False) == []
    with pytest.raises(
        ValueError,
        match=r"already holds a run \(config\.json\); pass --resume to continue it, --overwrite",
    ):
        check(cfg, resume=False)
    other = coldstart_config.get_config()
    other.embed_dim, other.epochs = 8, 99
    with pytest.raises(
        ValueError, match=r"different config \(embed_dim: 32 -> 8\); only epochs, patience"
    ):
        check(other, resume=True)
    with pytest.raises(
        ValueError,
        match=r"the data changed since the run .* \(ratings sha256 abc\.\.\. -> def\.\.\.\)",
    ):
        check(cfg, resume=True, sha="def")
    other = coldstart_config.get_config()
    other.epochs, other.meta_lr = 99, 1e-4  # allowed: e.g. to recover from a non-finite loss
    assert check(other, resume=True) == ["epochs", "meta_lr"]
    # a field added to the code after the run started is accepted (its default is used), reported
    path = os.path.join(wd, "config.json")
    saved = json.load(open(path))
    del saved["config"]["embed_dim"]
    json.dump(saved, open(path, "w"))
    logged = []
    assert check(cfg, resume=True, log_fn=logged.append) == ["embed_dim", "epochs", "meta_lr"]
    assert "fields new since the run started (their defaults are used): embed_dim" in logged[0]


def test_config_diff_names_nested_fields_and_mutable_patterns():
    old = {"epochs": 20, "methods": {"a": {"epochs": 30, "model": "mlp"}}, "settings": {"x": 1}}
    new = {"epochs": 20, "methods": {"a": {"epochs": 40, "model": "melu", "patience": 8}}}
    new["settings"], new["seeds"] = {"x": 2}, [0]
    assert config_diff(old, new) == [
        "methods.a.epochs",
        "methods.a.model",
        "methods.a.patience",
        "seeds",
        "settings.x",
    ]
    # a whole dict on one side only is one name; equal configs have no differences
    assert config_diff({"m": 1}, {"m": {"a": 1}}) == ["m"] and config_diff(new, new) == []
    mutable = ("seeds", "settings", "methods.*.epochs")
    assert is_mutable("methods.a.epochs", mutable) and is_mutable("settings.x", mutable)
    assert not is_mutable("methods.a.model", mutable) and not is_mutable("epochs", mutable)


def test_resume_may_change_a_methods_own_budget_not_its_other_fields(tmp_path):
    """The time job's cf_metasgd trains with a budget of its own (methods.cf_metasgd.epochs); a
    resume may change it as it may change the base epochs, but not the method's other fields."""
    wd = str(tmp_path / "run")

    def check(cfg):
        return check_resume(
            wd, cfg.to_dict(), resume=True, mutable=pipeline.RESUME_MUTABLE, log_fn=lambda m: None
        )

    cfg = time_config.get_config()
    assert check(cfg) == []
    longer = time_config.get_config()
    longer.methods.cf_metasgd.epochs = cfg.methods.cf_metasgd.epochs + 10
    longer.methods.cf_metasgd.patience = 12
    assert check(longer) == ["methods.cf_metasgd.epochs", "methods.cf_metasgd.patience"]
    other = time_config.get_config()
    other.methods.cf_metasgd.epochs = 99
    dim = cfg.methods.cf_metasgd.cf_dim
    other.methods.cf_metasgd.cf_dim = dim + 1
    with pytest.raises(
        ValueError,
        match=rf"different config \(methods\.cf_metasgd\.cf_dim: {dim} -> {dim + 1}\); only",
    ):
        check(other)


# ---------------------------------------------------------------- scripts: one line, no traceback
def _script(module, *flags):
    return subprocess.run(
        [sys.executable, "-m", module, *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _one_line_error(out, name: str) -> str:
    """The single stderr line of a failed script run, after checking the run failed cleanly."""
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(f"{name}: error: "), lines[0]
    return lines[0]


# script -> (module, prefix of the config fields holding dataset / data_dir)
DATA_SCRIPTS = {
    "coldstart": ("experiments.coldstart.main", "--config."),
    "describe_data": ("experiments.describe_data.main", "--config."),
    "large_model": ("experiments.large_model.main", "--config."),
    "meta_rl": ("experiments.meta_rl.main", "--config."),
    "pretrain": ("experiments.pretrain.main", "--config."),
    "tune": ("experiments.tune.main", "--config.base."),
}
CASES = ("bad-folder", "workdir-is-a-file", "bad-file", "bad-config-value", "unknown-config-field")


def _cases(scripts, cases):
    """Every (script, case); only the bad-file cases run by default (each case starts a process)."""
    marks = {c: () if c == "bad-file" else pytest.mark.slow for c in cases}
    return [pytest.param(s, c, marks=marks[c]) for s in scripts for c in cases]


def _data_script_case(case, prefix, tmp_path, malformed):
    """``(flags, expected parts of the error line)`` of one bad input."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    u_data = os.path.join(malformed, "u.data")
    n_lines = sum(1 for _ in open(u_data))
    return {
        "bad-folder": (
            [f"{prefix}data_dir=/no/such/dir"],
            ["/no/such/dir: data_dir does not exist or is not a folder"],
        ),
        "workdir-is-a-file": (
            [f"--workdir={a_file}"],
            [f"--workdir={a_file} exists and is not a folder"],
        ),
        "bad-file": (
            [f"{prefix}data_dir={malformed}"],
            [f"{u_data}, line {n_lines}, field 'rating': expected a number, got 'four'"],
        ),
        # meta_rl also allows its synthetic simulator
        "bad-config-value": (
            [f"{prefix}dataset=ml-25m"],
            ["'ml-25m'; allowed: ", "ml-100k, ml-1m"],
        ),
        "unknown-config-field": (
            ["--config.no_such_field=1"],
            ["--config.no_such_field: unknown config field"],
        ),
    }[case]


@pytest.mark.parametrize("script,case", _cases(DATA_SCRIPTS, CASES))
def test_script_answers_bad_input_in_one_line(tmp_path, malformed_ml100k_dir, script, case):
    module, prefix = DATA_SCRIPTS[script]
    flags, expected = _data_script_case(case, prefix, tmp_path, malformed_ml100k_dir)
    if not any(f.startswith("--workdir=") for f in flags):
        flags.append(f"--workdir={tmp_path / 'run'}")
    line = _one_line_error(_script(module, *flags), script)
    assert all(part in line for part in expected), line


REPORT_CASES = {
    "workdir-is-a-file": "neither results.json nor rl_results.json found",
    "bad-file": r"results.json, line 1, column 13: not valid JSON",
    "missing-workdir": "--workdir is required: the folder of a finished run",
    "unknown-flag": "Unknown command line flag 'no_such_flag'",
}


@pytest.mark.parametrize("script,case", _cases(["report"], REPORT_CASES))
def test_report_answers_bad_input_in_one_line(tmp_path, script, case):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (tmp_path / "results.json").write_text('{"dataset": ')
    flags = {
        "workdir-is-a-file": [f"--workdir={a_file}"],
        "bad-file": [f"--workdir={tmp_path}"],
        "missing-workdir": [],
        "unknown-flag": [f"--workdir={tmp_path}", "--no_such_flag"],
    }[case]
    line = _one_line_error(_script(f"experiments.{script}.main", *flags), script)
    assert REPORT_CASES[case] in line, line


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
        (["--config.seeds=0,one"], "--config.seeds"),
        pytest.param(
            ["--config.data_dir=/x", "--config.download"],
            "download fetches GroupLens' zip into the cache; it cannot be combined with data_dir",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["resume+overwrite", "bad-seeds", "data_dir+download"],
)
def test_coldstart_rejects_bad_flags(tmp_path, flags, message):
    out = _script("experiments.coldstart.main", *flags, f"--workdir={tmp_path}")
    line = _one_line_error(out, "coldstart")
    assert message in line, line


def test_new_item_mean_probe_configs_write_no_defaults():
    from experiments.tune.configs import default as tune_default
    from experiments.tune.configs import new_item_mean

    grid, search = new_item_mean.get_config(), new_item_mean.get_config("search")
    assert grid.write_config == "" == search.write_config  # tuned.json is the tune stage's alone
    assert not grid.spaces and dict(grid.grid) == {"cf_new_item_mean": (0.0, 0.25, 0.5, 0.75)}
    base = tune_default.get_config()
    assert dict(search.spaces.cf_metasgd) == dict(base.spaces.cf_metasgd) | {
        "cf_new_item_mean": "float:0.0:1.0"
    }
    assert search.base.methods.cf_metasgd.cf_new_item_mean == 0.5
    with pytest.raises(ValueError, match="allowed: grid, search"):
        new_item_mean.get_config("bogus")
