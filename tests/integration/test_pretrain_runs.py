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


def _sequences(U=40, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, V, (U, L)).astype(np.int32)
    n = rng.integers(3, L + 1, U)
    mask = (np.arange(L)[None] < n[:, None]).astype(np.float32)
    items = items * mask.astype(np.int32)
    ratings = (mask * rng.integers(1, 6, (U, L))).astype(np.float32)
    return mpre.Sequences(items=items, ratings=ratings, mask=mask, user=np.arange(U))


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


def _kill_at(epoch):
    def log_fn(rec):
        if rec["epoch"] == epoch:
            raise _Kill()

    return log_fn


@pytest.fixture(scope="module")
def split():
    return mpre.holdout_split(_sequences(), 0.25, seed=0)


@pytest.fixture(scope="module")
def straight(split):
    return mpre.pretrain(split[0], ENC, PCFG)  # (the jitted epoch is shared by the calls below)


def test_pretrain_resume_ends_with_identical_params(split, straight, tmp_path):
    train, _ = split
    params, history = straight
    d = str(tmp_path / "train_state")
    with Checkpointer(d, keep_last=2, keep_best=0) as ck, pytest.raises(_Kill):
        # killed while logging epoch 3: epochs 1 and 2 are checkpointed, epoch 3 is lost
        mpre.pretrain(train, ENC, PCFG, log_fn=_kill_at(3), checkpointer=ck)
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        assert ck.all_steps() == [1, 2]
        seen = []
        p2, h2 = mpre.pretrain(train, ENC, PCFG, log_fn=seen.append, checkpointer=ck, resume=True)
        assert [r["epoch"] for r in seen] == [3, 4]  # only the missing epochs are trained
        assert ck.all_steps() == [3, 4]  # the last 2 are kept
        st, meta = ck.restore(4, {"params": params, "opt_state": mpre.make_optimizer(PCFG, 3).init(params),
                                  "key": jax.random.PRNGKey(0)})  # fmt: skip
    assert h2 == history
    assert tree_digest(p2) == tree_digest(params)
    assert tree_digest(st["params"]) == tree_digest(params) and meta["epoch"] == 4


def test_pretrain_resume_refuses_another_config(split, straight, tmp_path):
    train, _ = split
    d = str(tmp_path / "train_state")
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        mpre.pretrain(train, ENC, PCFG, checkpointer=ck)
        with pytest.raises(ValueError, match="another pretraining run.*pretrain"):
            mpre.pretrain(train, ENC, dataclasses.replace(PCFG, lr=1e-2), checkpointer=ck, resume=True)
        # resuming a finished run trains nothing and returns the same result
        p, h = mpre.pretrain(train, ENC, PCFG, checkpointer=ck, resume=True)
    assert h == straight[1] and tree_digest(p) == tree_digest(straight[0])


def test_pretrain_stops_on_non_finite_loss(split, straight, tmp_path):
    train, _ = split
    bad = jax.tree_util.tree_map(lambda a: a * np.nan, straight[0])
    with Checkpointer(str(tmp_path / "s"), keep_last=2, keep_best=0) as ck:
        with pytest.raises(FloatingPointError, match="non-finite loss in epoch 1.*no checkpoint"):
            mpre.pretrain(train, ENC, PCFG, params=bad, checkpointer=ck)
        assert ck.latest_step() is None


def test_pretrain_script_run_json_metrics_and_resume(tmp_path):
    script = _script("pretrain")
    from metarec import data as mdata

    data = mdata.load_dataset("ml-100k", data_dir=write_ml100k(tmp_path / "ml", n_users=80, n_items=60,
                                                                 min_per_user=14, max_per_user=40, seed=4))  # fmt: skip
    enc = dict(max_len=L, width=16, depth=1, heads=2, dropout_rate=0.0)
    pcfg = mpre.PretrainConfig(epochs=3, batch_size=32, seed=0)
    wd = str(tmp_path / "run")
    argv = ["-m", "experiments.pretrain", "--workdir", wd]

    def kill_on_epoch(n):
        def p(msg):
            if msg.startswith("{") and json.loads(msg)["epoch"] == n:
                raise _Kill()
        return p

    bar = io.StringIO()
    with pytest.raises(_Kill):
        script.run_pretrain(data, 0, "melu", enc, pcfg, 0.1, wd, argv=argv, print_fn=kill_on_epoch(2),
                            progress_stream=bar)  # fmt: skip
    assert "pretrain 1/3" in bar.getvalue()
    with pytest.raises(ValueError, match="--resume"):
        script.run_pretrain(data, 0, "melu", enc, pcfg, 0.1, wd, argv=argv, print_fn=lambda m: None)
    out = script.run_pretrain(data, 0, "melu", enc, pcfg, 0.1, wd, resume=True, argv=argv + ["--resume"],
                              print_fn=lambda m: None, progress_stream=bar)  # fmt: skip
    assert out["resumed_from"] == 1 and [r["epoch"] for r in out["history"]] == [1, 2, 3]
    run = read_json(os.path.join(wd, "run.json"))
    assert run["seed"] == 0 and run["data_sha256"] == mdata.data_checksum(data) and len(run["data_sha256"]) == 64
    assert run["config"]["pretrain"]["epochs"] == 3 and run["config"]["encoder"]["width"] == 16
    assert {"jax", "orbax-checkpoint", "python"} <= set(run["versions"])
    assert run["command"].endswith("--resume") and len(run["invocations"]) == 2
    rows = [r for r in read_metrics(wd) if r["unit"] == "pretrain"]
    assert [r["step"] for r in rows] == [1, 2, 3]  # epoch 2 logged before the kill is not doubled
    assert all(np.isfinite(r["loss"]) for r in rows)
    # the final checkpoint keeps load_pretrained's format
    cfg, params, info = mpre.load_pretrained(wd, with_metadata=True)
    assert cfg.width == 16 and info["metadata"]["data_sha256"] == run["data_sha256"]
    assert read_json(os.path.join(wd, "history.json")) == out["history"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        script.run_pretrain(data, 0, "melu", enc, pcfg, 0.1, wd, resume=True, argv=argv, print_fn=lambda m: None)


# ---------------------------------------------------------------------------------------------
# meta-RL benchmark bookkeeping
# ---------------------------------------------------------------------------------------------
