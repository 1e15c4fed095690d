"""Run logs: the progress line, metrics files, run metadata, atomic JSON, removing a run's files."""

from __future__ import annotations

import importlib.metadata
import io
import os
import platform

import pytest

from metarec.training import runlog


def test_progress_rate_and_eta():
    t = {"now": 100.0}
    buf = io.StringIO()
    bar = runlog.Progress(
        100, "seed0/maml", done=20, stream=buf, clock=lambda: t["now"], file_interval=5.0
    )
    t["now"] = 110.0
    bar.update(40, loss=0.5)  # 20 units in 10 s -> 2/s; 60 left -> 30 s
    assert bar.rate() == 2.0 and bar.eta() == 30.0
    line = buf.getvalue().strip()
    assert line == "seed0/maml 40/100 ( 40%) 2.00/s elapsed 10s ETA 30s loss 0.5"
    t["now"] = 111.0
    bar.update(41)  # within file_interval: not drawn
    assert buf.getvalue().count("\n") == 1
    bar.close()
    assert buf.getvalue().count("\n") == 2
    formatted = [runlog.format_seconds(s) for s in (5, 75, 3700, float("inf"))]
    assert formatted == ["5s", "1m15s", "1h01m", "?"]


def test_metrics_writer_jsonl_csv_and_truncate(tmp_path):
    w = runlog.MetricsWriter(str(tmp_path), tensorboard=False)
    for s in (1, 2, 3):
        w.write({"unit": "a", "kind": "step", "step": s, "loss": s / 10})
        w.write({"unit": "b", "kind": "step", "step": s, "loss": s})
    assert w.truncate("a", 1) == 2
    w.write({"unit": "a", "kind": "epoch", "step": 2, "val_mae": 0.7})
    w.close()
    recs = runlog.read_metrics(str(tmp_path))
    expected = [("a", 1), ("b", 1), ("b", 2), ("b", 3), ("a", 2)]
    assert [(r["unit"], r["step"]) for r in recs] == expected
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(runlog.CSV_FIELDS) and len(lines) == 6
    assert lines[-1] == "a,epoch,2,,,,,0.7,"
    with pytest.raises(ValueError, match="needs 'unit' and 'step'"):
        runlog.MetricsWriter(str(tmp_path), tensorboard=False).write({"loss": 1.0})


def test_run_metadata_and_atomic_json(tmp_path):
    meta = runlog.run_metadata({"a": 1}, ["-m", "experiments.meta_train", "--seeds=0"])
    assert meta["command"].endswith("-m experiments.meta_train --seeds=0")
    assert meta["config"] == {"a": 1} and meta["versions"]["jax"] not in ("", "not installed")
    # the versions recorded are the installed ones
    assert meta["versions"]["python"] == platform.python_version()
    for package in runlog.PACKAGES:
        assert meta["versions"][package] == importlib.metadata.version(package), package
    p = runlog.write_json_atomic(str(tmp_path / "sub" / "x.json"), {"v": [1, 2]})
    assert runlog.read_json(p) == {"v": [1, 2]} and os.listdir(tmp_path / "sub") == ["x.json"]


def test_remove_run_files_deletes_only_the_named_files(tmp_path):
    (tmp_path / "checkpoints" / "seed0").mkdir(parents=True)
    (tmp_path / "checkpoints" / "seed0" / "x").write_text("1")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("2")
    (tmp_path / "tb").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    names = ["checkpoints", "results.json", "metrics.jsonl", "tb"]
    removed = runlog.remove_run_files(str(tmp_path), names)
    assert removed == ["checkpoints", "results.json", "tb"]
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "notes.txt"]
    # a symlink is unlinked, never followed
    assert (tmp_path / "elsewhere" / "keep").read_text() == "2"


def test_progress_eta_ignores_a_slow_first_step_and_later_compilation():
    t, compiled = {"now": 0.0}, {"s": 0.0}
    bar = runlog.Progress(
        10, stream=io.StringIO(), clock=lambda: t["now"], compile_seconds=lambda: compiled["s"]
    )
    t["now"] = 100.0  # the first step compiled for 100 s (nothing told the bar)
    bar.update()
    assert bar.rate() == pytest.approx(1 / 100)  # one unit known: the whole window
    t["now"] = 102.0
    bar.update(3)  # 2 units in the 2 s after the first step: 1/s, 7 left -> 7 s (not 238 s)
    assert bar.rate() == 1.0 and bar.eta() == 7.0
    t["now"], compiled["s"] = 106.0, 2.0  # 2 more units in 4 s, 2 of which compiled an eval
    bar.update(5)
    assert bar.rate() == pytest.approx(4 / (6 - 2)) and bar.eta() == pytest.approx(5.0)
    assert "ETA 5s" in bar.line()


def test_progress_rate_before_a_second_update_leaves_out_known_compile_seconds():
    t, compiled = {"now": 0.0}, {"s": 10.0}
    bar = runlog.Progress(
        9, stream=io.StringIO(), clock=lambda: t["now"], compile_seconds=lambda: compiled["s"]
    )
    assert bar.rate() == 0.0 and runlog.format_seconds(bar.eta()) == "?"
    t["now"], compiled["s"] = 100.0, 106.0  # 96 of the first step's 100 s were compilation
    bar.update()
    assert bar.rate() == 0.25 and bar.eta() == 32.0


def test_compile_seconds_grow_when_a_new_function_compiles_and_not_when_it_runs_again():
    import jax
    import jax.numpy as jnp

    from metarec.training.compile_time import compile_seconds, split_seconds

    x = jnp.arange(5.0)
    before = compile_seconds()
    f = jax.jit(lambda v: jnp.tanh(v) * 3.0 + before)  # a function no other test compiled
    f(x).block_until_ready()
    after_first = compile_seconds()
    assert after_first > before
    for _ in range(3):
        f(x).block_until_ready()
    assert compile_seconds() == after_first
    split = split_seconds(10.0, before)
    assert split["compile_seconds"] == round(after_first - before, 3)
    assert split["compute_seconds"] == pytest.approx(10.0 - split["compile_seconds"], abs=1e-3)
