"""Task shards, the streaming loader and the synthetic generator at scale (small sizes)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from metarec.data import shards as mshards
from metarec.data import stream as mstream
from metarec.data import synthetic_scale as ss

SPEC = ss.ScaleSpec(n_users=600, n_items=200, mean_ratings=20, chunk_users=250, seed=3)


@pytest.fixture(scope="module")
def scale_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    ss.generate_ratings(SPEC, str(root / "ratings"))
    ss.encode_to_shards(
        ss.iter_chunks(str(root / "ratings")), str(root / "shards"), seed=0, shard_size=100
    )
    return str(root / "ratings"), str(root / "shards")


def test_each_process_reads_disjoint_shards_that_cover_every_task(scale_dirs):
    _, sdir = scale_dirs
    index = mshards.read_index(sdir)
    everyone = mshards.open_shards(sdir).take(np.arange(index["n_tasks"])).user_id
    assert len(index["shards"]) == 6 and len(set(everyone.tolist())) == index["n_tasks"]
    for n in (2, 3):
        parts = []
        for p in range(n):
            sh = mshards.open_shards(sdir, p, n)
            assert sh.names == [s["name"] for s in index["shards"][p::n]]
            seen = set()
            with mstream.MetaBatchStream(
                sh, lambda s: s, meta_batch=10, start=mstream.LoaderState(1), epochs=1
            ) as st:
                for batch, _ in st:
                    seen |= set(batch.user_id.tolist())
            mine = set(sh.take(np.arange(sh.n_tasks)).user_id.tolist())
            assert seen <= mine  # the stream reads only this process's shards
            parts.append(mine)
        assert sum(len(q) for q in parts) == len(everyone)
        assert set().union(*parts) == set(everyone.tolist())


def test_drawn_tasks_follow_the_sampling_rule(scale_dirs):
    rdir, _ = scale_dirs
    chunk = next(ss.iter_chunks(rdir))
    sets = ss.draw_user_sets(chunk, np.random.default_rng(0), max_ratings=30, n_query=5)
    for t in range(sets.n_users):
        u = sets.user_id[t]
        n = int((chunk["user"] == u).sum())
        s, q = int(sets.support_mask[t].sum()), int(sets.query_mask[t].sum())
        m = min(n, 30)
        assert (s + q, q) == (m, min(5, m - 3))
        items = np.concatenate([sets.support_item[t, :s], sets.query_item[t, :q]])
        assert len(set(items.tolist())) == m
        assert set(items.tolist()) <= set(chunk["item"][chunk["user"] == u].tolist())


def test_generator_is_deterministic_and_power_law(tmp_path, scale_dirs):
    rdir, _ = scale_dirs
    again = str(tmp_path / "again")
    ss.generate_ratings(SPEC, again)
    for a, b in zip(ss.iter_chunks(rdir), ss.iter_chunks(again)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    spec = ss.ScaleSpec(n_users=20000, n_items=2000, mean_ratings=30, chunk_users=10000)
    act = ss.user_activity(spec)
    assert 25 < act.mean() < 35
    top = np.sort(act)[-len(act) // 100 :].mean()
    assert top / np.median(act) > 10  # heavy tail: the top 1% rate >10x the median user
    meta = ss.generate_ratings(spec, str(tmp_path / "big"))
    items = np.concatenate([c["item"] for c in ss.iter_chunks(str(tmp_path / "big"))])
    counts = np.sort(np.bincount(items, minlength=spec.n_items + 1)[1:])[::-1]
    assert meta["n_ratings"] == len(items) > 0.95 * act.sum()  # few popular repeats left
    assert counts[:20].sum() > 0.15 * len(items)  # Zipf: top 1% of items, >15% of ratings
    assert counts[:20].mean() > 50 * np.median(counts)


def test_resume_mid_epoch_continues_bit_identically(scale_dirs):
    rdir, sdir = scale_dirs
    sh, enc = mshards.open_shards(sdir), ss.ScaleFeatures(rdir).encode
    kw = {"meta_batch": 16, "epochs": 2}
    with mstream.MetaBatchStream(sh, enc, start=mstream.LoaderState(9), buffer=3, **kw) as st:
        full = list(st)
    n_b = len(full) // 2
    assert len(full) == 2 * (600 // 16) and full[n_b - 1][1] == mstream.LoaderState(9, 1, n_b)
    k = n_b - 7  # stop mid-epoch 1, save the state as JSON, start a new loader from it
    with mstream.MetaBatchStream(sh, enc, start=mstream.LoaderState(9), buffer=3, **kw) as st:
        for _ in range(k):
            next(st)
        saved = json.dumps(st.state.to_dict())
    start = mstream.LoaderState.from_dict(json.loads(saved))
    with mstream.MetaBatchStream(sh, enc, start=start, buffer=1, **kw) as st:
        rest = list(st)
    assert len(rest) == len(full) - k
    import jax

    for (a, sa), (b, sb) in zip(full[k:], rest):
        assert sa == sb
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def test_the_loader_holds_at_most_its_buffer(scale_dirs):
    _, sdir = scale_dirs
    sh = mshards.open_shards(sdir)
    for buffer in (1, 3):
        with mstream.MetaBatchStream(
            sh, lambda s: s, meta_batch=8, start=mstream.LoaderState(0), buffer=buffer
        ) as st:
            for _ in range(6):
                next(st)
                deadline = time.monotonic() + 5  # a slow consumer: the reader fills its buffer
                while buffer > 1 and st.held_tasks < buffer * 8 and time.monotonic() < deadline:
                    time.sleep(0.002)
            assert st.peak_held_tasks == buffer * 8  # reached, and never above


def test_bad_shards_and_arguments_are_named_in_one_line(tmp_path, scale_dirs):
    _, sdir = scale_dirs
    index = mshards.read_index(sdir)
    with pytest.raises(ValueError, match=r"^process_index=2 with process_count=2"):
        mshards.open_shards(sdir, 2, 2)
    with pytest.raises(ValueError, match="process_index=6: .* 6 shard"):
        mshards.open_shards(sdir, 6, 7)
    with pytest.raises(FileNotFoundError, match="shards.json: no shard index"):
        mshards.open_shards(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(sdir, broken)
    path = broken / index["shards"][1]["name"] / "support_item.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(mshards.ShardError, match=f"^{path}: corrupt shard file") as e:
        mshards.open_shards(str(broken))
    assert "\n" not in str(e.value)
    path.write_bytes(data[:-1] + b"\x01")  # same size, one byte flipped: only the CRC sees it
    mshards.open_shards(str(broken))
    with pytest.raises(mshards.ShardError, match=f"^{path}: corrupt shard file .*CRC"):
        mshards.open_shards(str(broken), verify=True)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"^{path}: shard file missing"):
        mshards.open_shards(str(broken))
    mshards.open_shards(str(broken), 0, 2)  # another process's shard is not this one's business
    with pytest.raises(ValueError, match="user ids must ascend"):
        chunks = list(ss.iter_chunks(scale_dirs[0]))
        ss.encode_to_shards(chunks[::-1], str(tmp_path / "s2"), seed=0)


def _all_tasks(directory):
    sh = mshards.open_shards(directory)
    return sh.take(np.arange(sh.n_tasks))


def test_each_process_redraws_its_own_chunks_every_epoch(scale_dirs, tmp_path):
    rdir, sdir = scale_dirs
    chunks = list(ss.iter_chunks(rdir))
    assert len(chunks) == 3

    def encode(name, **kw):
        ss.encode_to_shards(iter(chunks), str(tmp_path / name), seed=0, shard_size=100, **kw)
        return _all_tasks(str(tmp_path / name))

    fixed = _all_tasks(sdir)
    e1, e2 = encode("e1", epoch=1), encode("e2", epoch=2)
    again = encode("e1b", epoch=1)
    np.testing.assert_array_equal(e1.support_item, again.support_item)  # seeded by (seed, epoch)
    np.testing.assert_array_equal(e1.user_id, fixed.user_id)  # the same users every epoch ...
    for a, b in ((e1, e2), (e1, fixed)):  # ... with other support/query splits
        assert not np.array_equal(a.query_item, b.query_item)
    # two processes: each encodes chunks p::2, and together exactly the one-process draw
    parts = [encode(f"p{p}", epoch=1, process_index=p, process_count=2) for p in (0, 1)]
    by_user = {}
    for part in parts:
        for t, u in enumerate(part.user_id.tolist()):
            by_user[u] = (part.support_item[t].tolist(), part.query_item[t].tolist())
    assert sorted(by_user) == sorted(e1.user_id.tolist())
    for t, u in enumerate(e1.user_id.tolist()):
        assert by_user[u] == (e1.support_item[t].tolist(), e1.query_item[t].tolist())
    # process 1 holds chunk 1 only
    assert set(parts[1].user_id.tolist()) <= set(chunks[1]["user"].tolist())
    with pytest.raises(ValueError, match="process_index=2 with process_count=2"):
        encode("bad", process_index=2, process_count=2)
