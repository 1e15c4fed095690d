"""experiments/report.py: Markdown tables with the right numbers, valid PNG figures, the RL curve
when rl_results.json exists, clear errors; and runlog's progress line, metrics files and metadata."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from experiments import report
from metarec.training import runlog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _ms(mean, std=0.01):
    return {"mean": mean, "std": std}


def _results():
    scen = ("warm_test", "user_cold", "item_cold", "user_item_cold")
    res = {
        "dataset": "ml-100k", "protocol": "melu", "seeds": [0, 1],
        "config": {"adapt": "decision", "inner_steps": 5, "inner_lr": 0.05},
        "scenarios": {s: {"n_users": 10 + i} for i, s in enumerate(scen)},
        "results": {s: {"random": {"ndcg@3": _ms(0.5)},
                        "maml": {"mae": _ms(0.80 + i / 100), "rmse": _ms(1.0), "ndcg@3": _ms(0.61)},
                        "user_mean": {"mae": _ms(0.90), "rmse": _ms(0.95), "ndcg@3": _ms(0.55)}}
                    for i, s in enumerate(scen)},
        "training": {str(seed): {"histories": {"maml": [{"epoch": e, "train_loss": 1.0 / e, "val_mae": 0.9 - 0.01 * e,
                                                          "seconds": e} for e in (1, 2, 3)]},
                                 "best_epoch": {"maml": 3}, "seconds": {"maml": 12.5}} for seed in (0, 1)},
        "adaptation": {"algo": "maml", "n_seeds": 2,
                       "steps": {s: {"0": _ms(0.95), "1": _ms(0.9), "5": _ms(0.85)} for s in scen},
                       "support": {s: {"1": {"mae": _ms(0.99), "n_users": 10.0}, "5": {"mae": _ms(0.88), "n_users": 8.5}}
                                   for s in scen}},
        "data": {"source": "/x/u.data", "format": "grouplens-100k", "sha256": "ab" * 32, "cleaning": {"ratings_kept": 5}},
        "command": "python -m experiments.meta_train --seeds=0,1", "versions": {"jax": "0.0"},
        "run": {"git_commit": "deadbeef", "devices": ["cpu"], "started_utc": "2026-01-01T00:00:00Z"},
    }  # fmt: skip
    return res


def _rl():
    return {"results": {"maml_pg": {"ctr": {"0": _ms(0.10), "1": _ms(0.15), "5": _ms(0.25)}},
                        "random": {"ctr": {"0": _ms(0.05), "5": _ms(0.05)}}}}  # fmt: skip


def test_report_tables_and_figures(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    (tmp_path / "rl_results.json").write_text(json.dumps(_rl()))
    path = report.make_report(str(tmp_path))
    assert path == str(tmp_path / "report" / "report.md")
    md = open(path).read()
    # numbers land in the right table cells; the best MAE of user_cold (maml 0.81) is bold, the worse is not
    assert "### user_cold (11 users)" in md
    assert "| maml | **0.8100 ± 0.0100** | 1.0000 ± 0.0100 | **0.6100 ± 0.0100** |" in md
    assert "| user_mean | 0.9000 ± 0.0100 | **0.9500 ± 0.0100** | 0.5500 ± 0.0100 |" in md
    assert "| random |  |  | 0.5000 ± 0.0100 |" in md
    assert "| 0 | maml | 3 | 0.8700 | 3 | 12.5 |" in md  # best val MAE = min over the history
    assert "| warm_test | 0.9900 ± 0.0100 (n=10) | 0.8800 ± 0.0100 (n=8.5) |" in md  # users, mean over seeds
    assert "| maml_pg | 0.1000 ± 0.0100 | 0.1500 ± 0.0100 | 0.2500 ± 0.0100 |" in md
    assert "| random | 0.0500 ± 0.0100 |  | 0.0500 ± 0.0100 |" in md
    assert "`python -m experiments.meta_train --seeds=0,1`" in md and "ab" * 32 in md
    for fig in ("scenario_bars", "training_curves", "adaptation_steps", "adaptation_support", "rl_ctr"):
        p = tmp_path / "report" / f"{fig}.png"
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000, fig
        assert f"({fig}.png)" in md


def test_report_rl_only_and_missing_inputs(tmp_path):
    (tmp_path / "rl_results.json").write_text(json.dumps(_rl()))
    md = open(report.make_report(str(tmp_path))).read()
    assert "## Meta-RL" in md and "Cold-start" not in md
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither results.json nor rl_results.json found"):
        report.make_report(str(empty))
    (empty / "results.json").write_text('{"dataset": ')
    with pytest.raises(ValueError, match=r"results\.json, line 1, column 13: not valid JSON"):
        report.make_report(str(empty))


def test_report_cli(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    out = subprocess.run([sys.executable, "-m", "experiments.report", f"--workdir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "report" / "report.md")
    bad = subprocess.run([sys.executable, "-m", "experiments.report", f"--workdir={tmp_path / 'nope'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 1 and "report: error:" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- runlog
def test_progress_rate_and_eta():
    t = {"now": 100.0}
    buf = io.StringIO()
    bar = runlog.Progress(100, "seed0/maml", done=20, stream=buf, clock=lambda: t["now"], file_interval=5.0)
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
    assert [runlog.format_seconds(s) for s in (5, 75, 3700, float("inf"))] == ["5s", "1m15s", "1h01m", "?"]


def test_metrics_writer_jsonl_csv_and_truncate(tmp_path):
    w = runlog.MetricsWriter(str(tmp_path), tensorboard=False)
    for s in (1, 2, 3):
        w.write({"unit": "a", "kind": "step", "step": s, "loss": s / 10})
        w.write({"unit": "b", "kind": "step", "step": s, "loss": s})
    assert w.truncate("a", 1) == 2
    w.write({"unit": "a", "kind": "epoch", "step": 2, "val_mae": 0.7})
    w.close()
    recs = runlog.read_metrics(str(tmp_path))
    assert [(r["unit"], r["step"]) for r in recs] == [("a", 1), ("b", 1), ("b", 2), ("b", 3), ("a", 2)]
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(runlog.CSV_FIELDS) and len(lines) == 6
    assert lines[-1] == "a,epoch,2,,,,,0.7,"
    with pytest.raises(ValueError, match="needs 'unit' and 'step'"):
        runlog.MetricsWriter(str(tmp_path), tensorboard=False).write({"loss": 1.0})


def test_run_metadata_and_atomic_json(tmp_path):
    meta = runlog.run_metadata({"a": 1}, ["-m", "experiments.meta_train", "--seeds=0"])
    assert meta["command"].endswith("-m experiments.meta_train --seeds=0")
    assert meta["config"] == {"a": 1} and meta["versions"]["jax"] not in ("", "not installed")
    assert meta["versions"]["orbax-checkpoint"] == "0.12.8" or meta["versions"]["orbax-checkpoint"]
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
    removed = runlog.remove_run_files(str(tmp_path), ["checkpoints", "results.json", "metrics.jsonl", "tb"])
    assert removed == ["checkpoints", "results.json", "tb"]
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "notes.txt"]
    assert (tmp_path / "elsewhere" / "keep").read_text() == "2"  # a symlink is unlinked, never followed
