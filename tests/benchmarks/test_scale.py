"""A tiny scale-benchmark size runs every phase and reports what the JSON promises; the linearity
summary compares epoch seconds per task. No timing is asserted."""

import math
import types

import pytest

from benchmarks.scale import bench

TINY = types.SimpleNamespace(
    mean_ratings=12.0,
    chunk_users=100,
    shard_size=64,
    meta_batch=8,
    learner="fomaml",
    inner_steps=1,
    width=8,
    embed_dim=4,
    steps=3,
    full_epoch_max_users=0,
    stream_batches=5,
    buffer=2,
    keep_data=False,
    seed=0,
    items_per_user=0.0,
    min_items=60,
    sparse_tables=False,
)


@pytest.mark.slow  # ~8 s, mostly compiling the step: the default suite's time budget is spent
@pytest.mark.parametrize("sparse", [False, True])
def test_one_size_runs_every_phase(tmp_path, sparse):
    # 600 items: the item-id table has more rows than a task reads, so it is the one gathered
    s = types.SimpleNamespace(
        **vars(TINY) | {"sparse_tables": sparse, "min_items": 600 if sparse else 60}
    )
    out = bench.run_size(200, s, str(tmp_path), lambda m: None)
    assert (out["n_users"], out["n_tasks"], out["n_shards"]) == (200, 200, 4)
    assert out["n_items"] == s.min_items
    assert out["train"]["gathered_tables"] == (["item_emb_1/embedding"] if sparse else [])
    assert math.isfinite(out["train"]["last_loss"])
    for p in ("generate", "encode", "stream", "train"):
        assert out[p]["seconds"] >= 0 and out[p]["peak_rss_mb"] > 0
    t = out["train"]
    assert t["n_batches"] == 25 and t["steps_timed"] == 3 and not t["epoch_measured"]
    assert abs(t["epoch_s"] - t["step_s_mean"] * 25) < 0.01  # n_batches x the mean step
    assert out["stream"]["batches"] == 5 and out["stream"]["peak_held_tasks"] <= 2 * 8
    assert not (tmp_path / "u200").exists()  # keep_data=False


def test_linearity_is_epoch_seconds_per_task():
    sizes = [
        {"n_users": n, "n_tasks": n, "train": {"epoch_s": s}}
        for n, s in ((10, 1.0), (100, 12.0), (1000, 131.0))
    ]
    got = bench.linearity(sizes)
    assert got["per_task_ratio_to_smallest"] == {"10": 1.0, "100": 1.2, "1000": 1.31}
    assert not got["within_25pct"]
