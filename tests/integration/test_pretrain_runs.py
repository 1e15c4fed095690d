"""Pretraining runs: per-epoch training state and --resume (bit-identical to an uninterrupted run),
refusal of another run's checkpoint, the non-finite-loss stop, and the script's workdir files."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import jax
import numpy as np
import pytest

from experiments.pretrain import pipeline
from experiments.pretrain.configs import default
from metarec import data as mdata
from metarec.data.sequences import holdout_split
from metarec.models.transformer import EncoderConfig
from metarec.training.checkpoint import Checkpointer, tree_digest
from metarec.training.encoder_checkpoint import load_pretrained
from metarec.training.pretrain import PretrainConfig, make_optimizer, pretrain
from metarec.training.runlog import read_json, read_metrics
from metarec.training.trainer import NonFiniteLossError
from tests.conftest import random_sequences, write_ml100k

V, L = 16, 8
ENC = EncoderConfig(num_items=V, max_len=L, width=16, depth=1, heads=2, dropout_rate=0.1)
PCFG = PretrainConfig(epochs=4, batch_size=16, lr=5e-3, seed=3)


class _Kill(Exception):
    """Stands in for a killed process."""


def _kill_at(epoch):
    def log_fn(rec):
        if rec["epoch"] == epoch:
            raise _Kill()

    return log_fn


@pytest.fixture(scope="module")
def split():
    return holdout_split(random_sequences(n_users=40, num_items=V, max_len=L), 0.25, seed=0)


@pytest.fixture(scope="module")
def straight(split):
    return pretrain(split[0], ENC, PCFG)  # (the jitted epoch is shared by the calls below)


def test_pretrain_resume_ends_with_identical_params(split, straight, tmp_path):
    train, _ = split
    params, history = straight
    d = str(tmp_path / "train_state")
    with Checkpointer(d, keep_last=2, keep_best=0) as ck, pytest.raises(_Kill):
        # killed while logging epoch 3: epochs 1 and 2 are checkpointed, epoch 3 is lost
        pretrain(train, ENC, PCFG, log_fn=_kill_at(3), checkpointer=ck)
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        assert ck.all_steps() == [1, 2]
        seen = []
        p2, h2 = pretrain(train, ENC, PCFG, log_fn=seen.append, checkpointer=ck, resume=True)
        assert [r["epoch"] for r in seen] == [3, 4]  # only the missing epochs are trained
        assert ck.all_steps() == [3, 4]  # the last 2 are kept
        like = {
            "params": params,
            "opt_state": make_optimizer(PCFG, 3).init(params),
            "key": jax.random.PRNGKey(0),
        }
        st, meta = ck.restore(4, like)
    assert h2 == history
    assert tree_digest(p2) == tree_digest(params)
    assert tree_digest(st["params"]) == tree_digest(params) and meta["host"]["epoch"] == 4


def test_pretrain_resume_refuses_another_config(split, straight, tmp_path):
    train, _ = split
    d = str(tmp_path / "train_state")
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        pretrain(train, ENC, PCFG, checkpointer=ck)
        other = dataclasses.replace(PCFG, lr=1e-2)
        with pytest.raises(ValueError, match="another pretraining run.*pretrain"):
            pretrain(train, ENC, other, checkpointer=ck, resume=True)
        # resuming a finished run trains nothing and returns the same result
        p, h = pretrain(train, ENC, PCFG, checkpointer=ck, resume=True)
    assert h == straight[1] and tree_digest(p) == tree_digest(straight[0])


def test_pretrain_stops_on_non_finite_loss(split, straight, tmp_path):
    train, _ = split
    bad = jax.tree_util.tree_map(lambda a: a * np.nan, straight[0])
    with Checkpointer(str(tmp_path / "s"), keep_last=2, keep_best=0) as ck:
        with pytest.raises(NonFiniteLossError, match="non-finite loss in epoch 1.*no checkpoint"):
            pretrain(train, ENC, PCFG, params=bad, checkpointer=ck)
        assert ck.latest_step() is None


@pytest.mark.slow  # over 6 s in the default suite (2026-12-07); CI runs `make test-slow` too
def test_pretrain_script_run_json_metrics_and_resume(tmp_path):
    directory = write_ml100k(
        tmp_path / "ml", n_users=80, n_items=60, min_per_user=14, max_per_user=40, seed=4
    )
    data = mdata.load_dataset("ml-100k", data_dir=directory)
    cfg = default.get_config()
    cfg.encoder.update(max_len=L, width=16, depth=1, heads=2, dropout_rate=0.0)
    cfg.pretrain.update(epochs=3, batch_size=32)
    pipeline.validate_config(cfg)
    wd = str(tmp_path / "run")
    argv = ["-m", "experiments.pretrain.main", "--workdir", wd]

    def kill_on_epoch(n):
        def p(msg):
            if msg.startswith("{") and json.loads(msg)["epoch"] == n:
                raise _Kill()

        return p

    def quiet(msg):
        return None

    bar = io.StringIO()
    with pytest.raises(_Kill):
        pipeline.run_pretrain(
            data, cfg, wd, argv=argv, print_fn=kill_on_epoch(2), progress_stream=bar
        )
    assert "pretrain 1/3" in bar.getvalue()
    with pytest.raises(ValueError, match="--resume"):
        pipeline.run_pretrain(data, cfg, wd, argv=argv, print_fn=quiet)
    out = pipeline.run_pretrain(
        data, cfg, wd, resume=True, argv=argv + ["--resume"], print_fn=quiet, progress_stream=bar
    )
    assert out["resumed_from"] == 1 and [r["epoch"] for r in out["history"]] == [1, 2, 3]
    run = read_json(os.path.join(wd, "run.json"))
    assert run["seed"] == 0 and run["data_sha256"] == mdata.data_checksum(data)
    assert len(run["data_sha256"]) == 64
    assert run["config"]["pretrain"]["epochs"] == 3 and run["config"]["encoder"]["width"] == 16
    assert {"jax", "orbax-checkpoint", "python"} <= set(run["versions"])
    assert run["command"].endswith("--resume") and len(run["invocations"]) == 2
    rows = [r for r in read_metrics(wd) if r["unit"] == "pretrain"]
    assert [r["step"] for r in rows] == [1, 2, 3]  # epoch 2 logged before the kill is not doubled
    assert all(np.isfinite(r["loss"]) for r in rows)
    # the final checkpoint keeps load_pretrained's format
    enc_cfg, params, info = load_pretrained(wd, with_metadata=True)
    assert enc_cfg.width == 16 and info["metadata"]["data_sha256"] == run["data_sha256"]
    assert read_json(os.path.join(wd, "history.json")) == out["history"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        pipeline.run_pretrain(data, cfg, wd, resume=True, argv=argv, print_fn=quiet)


def test_pretrain_config_errors_name_the_field():
    cfg = default.get_config()
    cfg.encoder.width = 63
    with pytest.raises(ValueError, match=r"--config.encoder.width=63 must be divisible"):
        pipeline.validate_config(cfg)
    cfg = default.get_config()
    cfg.pretrain.mask_prob = 0.0
    with pytest.raises(ValueError, match=r"--config.pretrain.mask_prob=0.0: must be in \[0.01"):
        pipeline.validate_config(cfg)
    cfg = default.get_config()
    cfg.dataset = "ml-10m"
    with pytest.raises(ValueError, match="allowed: .*ml-100k"):
        pipeline.validate_config(cfg)
