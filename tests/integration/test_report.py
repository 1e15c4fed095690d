"""experiments/report: Markdown tables with the right numbers, valid PNG figures, the RL curve when
rl_results.json exists, one-seed tables without a made-up spread, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.report import report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"
SCENARIOS = ("warm_test", "user_cold", "item_cold", "user_item_cold")


def _ms(mean, std=0.01):
    return {"mean": mean, "std": std}


def _results(seeds=(0, 1), std=0.01):
    def ms(mean):
        return _ms(mean, std)

    def history(seed):
        return {
            "histories": {
                "maml": [
                    {"epoch": e, "train_loss": 1.0 / e, "val_mae": 0.9 - 0.01 * e, "seconds": e}
                    for e in (1, 2, 3)
                ]
            },
            "best_epoch": {"maml": 3},
            "seconds": {"maml": 12.5},
        }

    return {
        "dataset": "ml-100k",
        "protocol": "melu",
        "seeds": list(seeds),
        "config": {"adapt": "decision", "inner_steps": 5, "inner_lr": 0.05},
        "scenarios": {s: {"n_users": 10 + i} for i, s in enumerate(SCENARIOS)},
        "results": {
            s: {
                "random": {"ndcg@3": ms(0.5)},
                "maml": {"mae": ms(0.80 + i / 100), "rmse": ms(1.0), "ndcg@3": ms(0.61)},
                "user_mean": {"mae": ms(0.90), "rmse": ms(0.95), "ndcg@3": ms(0.55)},
            }
            for i, s in enumerate(SCENARIOS)
        },
        "training": {str(seed): history(seed) for seed in seeds},
        "adaptation": {
            "algo": "maml",
            "n_seeds": len(seeds),
            "steps": {s: {"0": ms(0.95), "1": ms(0.9), "5": ms(0.85)} for s in SCENARIOS},
            "support": {
                s: {"1": {"mae": ms(0.99), "n_users": 10.0}, "5": {"mae": ms(0.88), "n_users": 8.5}}
                for s in SCENARIOS
            },
        },
        "data": {
            "source": "/x/u.data",
            "format": "grouplens-100k",
            "sha256": "ab" * 32,
            "cleaning": {"ratings_kept": 5},
        },
        "command": "python -m experiments.meta_train --seeds=0,1",
        "versions": {"jax": "0.0"},
        "run": {
            "git_commit": "deadbeef",
            "devices": ["cpu"],
            "started_utc": "2026-01-01T00:00:00Z",
        },
    }


def _rl(**extra):
    return {
        "results": {
            "maml_pg": {
                "ctr": {"0": _ms(0.10), "1": _ms(0.15), "5": _ms(0.25)},
                "cum_regret": {"0": _ms(2.0), "1": _ms(3.5), "5": _ms(8.0)},
            },
            "random": {"ctr": {"0": _ms(0.05), "5": _ms(0.05)}},
        },
        "oracle_ctr": _ms(0.4),
        **extra,
    }


def test_report_tables_and_figures(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    (tmp_path / "rl_results.json").write_text(json.dumps(_rl()))
    path = report.make_report(str(tmp_path))
    assert path == str(tmp_path / "report" / "report.md")
    md = open(path).read()
    # numbers land in the right cells; the best MAE of user_cold (maml 0.81) is bold, the worse not
    assert "### user_cold (11 users)" in md
    assert "| maml | **0.8100 ± 0.0100** | 1.0000 ± 0.0100 | **0.6100 ± 0.0100** |" in md
    assert "| user_mean | 0.9000 ± 0.0100 | **0.9500 ± 0.0100** | 0.5500 ± 0.0100 |" in md
    assert "| random |  |  | 0.5000 ± 0.0100 |" in md
    assert "| 0 | maml | 3 | 0.8700 | 3 | 12.5 |" in md  # best val MAE = min over the history
    # users, mean over seeds
    assert "| warm_test | 0.9900 ± 0.0100 (n=10) | 0.8800 ± 0.0100 (n=8.5) |" in md
    assert "| maml_pg | 0.1000 ± 0.0100 | 0.1500 ± 0.0100 | 0.2500 ± 0.0100 |" in md
    assert "| random | 0.0500 ± 0.0100 |  | 0.0500 ± 0.0100 |" in md
    assert "| oracle | 0.4000 ± 0.0100 | | |" in md
    assert "| maml_pg | 2.0000 ± 0.0100 | 3.5000 ± 0.0100 | 8.0000 ± 0.0100 |" in md
    assert "`python -m experiments.meta_train --seeds=0,1`" in md and "ab" * 32 in md
    for fig in (
        "scenario_bars",
        "training_curves",
        "adaptation_steps",
        "adaptation_support",
        "rl_ctr",
        "rl_regret",
    ):
        p = tmp_path / "report" / f"{fig}.png"
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000, fig
        assert f"({fig}.png)" in md


def test_one_seed_tables_show_no_spread(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results(seeds=(0,), std=0.0)))
    (tmp_path / "rl_results.json").write_text(json.dumps(_rl(seeds=[0])))
    md = open(report.make_report(str(tmp_path))).read()
    assert "±" not in md.replace("mean ± sample std", "")
    assert "one seed, so no spread" in md
    assert "| maml | **0.8100** | 1.0000 | **0.6100** |" in md
    assert "| random |  |  | 0.5000 |" in md
    assert "| warm_test | 0.9900 (n=10) | 0.8800 (n=8.5) |" in md
    assert "| maml_pg | 0.1000 | 0.1500 | 0.2500 |" in md


def test_report_rl_only_and_missing_inputs(tmp_path):
    (tmp_path / "rl_results.json").write_text(json.dumps(_rl()))
    md = open(report.make_report(str(tmp_path))).read()
    assert "## Meta-RL" in md and "Cold-start" not in md
    assert "rl_ndcg.png" not in md and "slate nDCG" not in md  # single items: no slate nDCG
    slates = _rl()
    slates["results"]["maml_pg"]["ndcg"] = {"0": _ms(0.5), "1": _ms(0.6), "5": _ms(0.7)}
    (tmp_path / "rl_results.json").write_text(json.dumps(slates))
    md = open(report.make_report(str(tmp_path))).read()
    assert "(rl_ndcg.png)" in md and (tmp_path / "report" / "rl_ndcg.png").stat().st_size > 5000
    assert "| maml_pg | 0.5000 ± 0.0100 | 0.6000 ± 0.0100 | 0.7000 ± 0.0100 |" in md
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither results.json nor rl_results.json found"):
        report.make_report(str(empty))
    (empty / "results.json").write_text('{"dataset": ')
    with pytest.raises(ValueError, match=r"results\.json, line 1, column 13: not valid JSON"):
        report.make_report(str(empty))


def _report_cli(*flags):
    return subprocess.run(
        [sys.executable, "-m", "experiments.report.main", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_report_cli(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    out = _report_cli(f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "report" / "report.md")
    bad = _report_cli(f"--workdir={tmp_path / 'nope'}")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"report: error: {tmp_path / 'nope'}: neither results.json nor rl_results.json found; "
        f"run an experiment with --workdir={tmp_path / 'nope'} first (or point --workdir at a "
        "finished run)"
    ]
