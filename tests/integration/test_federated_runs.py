"""The federated experiment end to end on small MovieLens-shaped files (quick config): results,
tables, figures and unit files; --resume reads finished units back; a bad config value is one
error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.federated import pipeline
from experiments.federated.configs import quick
from tests.conftest import REPO, write_ml100k


def _cmd(workdir, data_dir, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.federated.main",
        "--config=experiments/federated/configs/quick.py",
        f"--config.data_dir={data_dir}",
        f"--workdir={workdir}",
        *extra,
    ]


def _run(cmd):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def _strip(rec):
    return {k: v for k, v in rec.items() if k not in ("seconds", "wall_s", "history")} | {
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in rec["history"]]
    }


@pytest.mark.slow
def test_quick_config_end_to_end_and_resume(tmp_path):
    data = write_ml100k(tmp_path / "data", n_users=80)
    work = tmp_path / "run"
    first = _run(_cmd(work, data, "--config.settings=central,fed_iid"))
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((work / "results.json").read_text())
    assert set(res["results"]["user_cold"]) == {"central", "fed_iid"}
    for scen in ("warm_test", "user_cold", "item_cold", "user_item_cold"):
        for setting in ("central", "fed_iid"):
            assert set(res["results"][scen][setting]) == {"mae", "rmse", "ndcg@3"}
    fed = res["per_seed"]["0"]["fed_iid"]
    assert fed["bytes_up"] > 0 and fed["bytes_down"] >= fed["bytes_up"]  # drops: fewer up
    assert fed["history"][-1]["round"] == 4
    part = fed["partition"]
    assert part["iid"]["users"] == part["noniid"]["users"]
    assert part["noniid"]["tv_from_population"] > part["iid"]["tv_from_population"]
    assert (work / "report" / "federated_rounds.png").exists()
    assert (work / "report" / "federated_bytes.png").exists()
    assert "gap" in (work / "results.md").read_text()
    # resume with more settings: the finished units are read back, the new ones run
    second = _run(
        _cmd(work, data, "--resume", "--config.settings=central,fed_iid,fed_noniid,fed_iid_p10")
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "seed 0 central: finished earlier, read back" in second.stdout
    assert "seed 0 fed_iid: finished earlier, read back" in second.stdout
    res2 = json.loads((work / "results.json").read_text())
    for setting in ("central", "fed_iid"):
        a, b = res["per_seed"]["0"][setting], res2["per_seed"]["0"][setting]
        assert _strip(a) == _strip(b)
    assert set(res2["results"]["user_cold"]) == {"central", "fed_iid", "fed_noniid", "fed_iid_p10"}
    assert os.path.isdir(work / "checkpoints" / "seed0" / "fed_iid_p10")


def test_bad_config_is_one_error_line(tmp_path):
    out = _run(_cmd(tmp_path / "w", tmp_path / "nodata", "--config.fed.algorithm=fedsgd"))
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("federated: error: "), out.stderr[-2000:]
    assert "--config.fed.algorithm='fedsgd'; allowed: fedmeta, perfedavg, reptile" in lines[0]
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("settings", ("central", "fed_xx"), "--config.settings: unknown ['fed_xx']; allowed"),
        ("fed.low_participation", 0.0, "--config.fed.low_participation must be in (0, 1]"),
        ("fed.noniid_by", ("zip",), "--config.fed.noniid_by=zip; allowed"),
        ("fed.dp_epsilon", 2.0, "need --config.fed.dp_clip > 0"),
        ("fed.sampling", "all", "--config.fed.sampling='all'; allowed: uniform, poisson"),
        ("private.cf_knnn", False, "--config.private.cf_knnn: not a field"),
    ],
)
def test_bad_config_values_name_the_field(field, value, message):
    cfg = quick.get_config()
    node, _, name = field.rpartition(".")
    if node:
        cfg[node][name] = value
    else:
        cfg[name] = value
    with pytest.raises(ValueError) as e:
        pipeline.validate_config(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
