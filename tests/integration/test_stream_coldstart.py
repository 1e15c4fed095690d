"""Meta-batches streamed from task shards equal the cold-start experiment's in-memory ones, and
meta-training on the shards ends with the same parameters."""

from __future__ import annotations

import jax
import numpy as np

from experiments.coldstart import build
from experiments.coldstart.configs import default as default_config
from metarec.data import shards as mshards
from metarec.data import stream as mstream
from metarec.data.tasks import epoch_order, index_tasks
from metarec.training.meta_train import meta_train
from tests.conftest import load_ml100k, write_ml100k

SEED, B = 12345, 8  # sampler seed, meta-batch


def _in_memory(tasks, epochs):
    """The batches meta_train visits: epoch_order(seed, e) in meta-batches, remainder dropped."""
    n = tasks(1).num_tasks if callable(tasks) else tasks.num_tasks
    out = []
    for e in epochs:
        t, order = (tasks(e) if callable(tasks) else tasks), epoch_order(SEED, e, n)
        out += [index_tasks(t, order[b * B : (b + 1) * B]) for b in range(n // B)]
    return out


def _assert_same(got, want):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
        assert [p for p, _ in la] == [p for p, _ in lb]
        for (_, x), (_, y) in zip(la, lb):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)


def _seed_data(tmp_path, cfg):
    d = write_ml100k(tmp_path / "ml-100k", n_users=150, n_items=120, min_per_user=14, seed=11)
    return build.prepare_seed(load_ml100k(d), 0, cfg)


def test_streamed_meta_batches_equal_the_in_memory_path(tmp_path):
    sd = _seed_data(tmp_path, default_config.base_config())
    # fixed tasks ("fixed" mode), several shards, two epochs
    mshards.write_shards(
        sd.train_sets, str(tmp_path / "fixed"), shard_size=17, support_width=sd.width
    )
    sh = mshards.open_shards(str(tmp_path / "fixed"))
    assert len(sh.names) > 3 and sh.n_tasks == sd.train.num_tasks
    kw = {"meta_batch": B, "epochs": 2}
    with mstream.MetaBatchStream(sh, sd.encode, start=mstream.LoaderState(SEED), **kw) as st:
        got = [b for b, _ in st]
    _assert_same(got, _in_memory(sd.train, (1, 2)))
    # resumed from a mid-epoch state: the same following batches
    start = mstream.LoaderState(SEED, 1, 3)
    with mstream.MetaBatchStream(sh, sd.encode, start=start, buffer=1, **kw) as st:
        _assert_same([b for b, _ in st], got[3:])
    # "resample" mode: epoch 3's draw, written once, streams as the per-epoch sampler's epoch 3
    mshards.write_shards(
        sd.draws["resample"](3), str(tmp_path / "e3"), shard_size=40, support_width=sd.width
    )
    sh3 = mshards.open_shards(str(tmp_path / "e3"))
    start = mstream.LoaderState(SEED, 3, 0)
    with mstream.MetaBatchStream(sh3, sd.encode, meta_batch=B, start=start, epochs=3) as st:
        got3 = [b for b, _ in st]
    want3 = _in_memory(sd.samplers["resample"], (3,))
    _assert_same(got3, want3)


def test_meta_training_on_shards_ends_with_the_in_memory_parameters(tmp_path):
    cfg = default_config.base_config()
    cfg.embed_dim, cfg.hidden, cfg.inner_steps, cfg.meta_batch = 4, (8,), 1, 16
    cfg.epochs, cfg.patience, cfg.eval_chunk = 1, 1, 32
    sd = _seed_data(tmp_path, cfg)
    mshards.write_shards(sd.train_sets, str(tmp_path / "s"), shard_size=30, support_width=sd.width)
    on_disk = mstream.ShardTasks(mshards.open_shards(str(tmp_path / "s")), sd.encode)
    fns = build.Compiled(cfg)
    spec = sd.encoder.spec
    init_fn, _ = fns.model(spec)
    k_init, key = jax.random.split(jax.random.PRNGKey(0))
    # validation scores are not compared here: a stub evaluation spares its compilation
    args = (fns.learner(spec, "fomaml"), fns.step(spec, "fomaml"), lambda p, b: {"pred": b.query.y})
    params = init_fn(k_init)

    def run(train):
        return meta_train(*args, params, train, sd.val, cfg, key, (1.0, 5.0))

    ref, got = run(sd.train), run(on_disk)
    assert ref.steps == got.steps > 0 and ref.params_sha256 == got.params_sha256
    assert [h["train_loss"] for h in ref.history] == [h["train_loss"] for h in got.history]
