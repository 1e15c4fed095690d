"""Padding to shared shapes (fewer compiled programs on a first run) leaves every value unchanged:
baseline predictions, neighbour features and per-task metrics equal the unpadded computation
bit for bit, and task sets of different sizes reuse one compiled program."""

import numpy as np
import pytest

from metarec import metrics as mmetrics
from metarec.baselines import make_baseline
from metarec.baselines import neighbours as nb
from metarec.baselines.common import _run_predict_jit
from metarec.baselines.means import _global_core, _item_core, _user_core
from metarec.baselines.mf import _mf_core
from metarec.data.tasks import Examples, Task
from metarec.training.meta_train import evaluate


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(7)
    n_users, n_items = 40, 30
    obs = rng.random((n_users, n_items)) < 0.5
    r = np.clip(np.round(3 + rng.normal(size=(n_users, 1)) + rng.normal(size=(1, n_items))), 1, 5)
    u, i = np.nonzero(obs)
    train = (100 + u, 500 + i, r[u, i].astype(np.float32))

    def tasks(t, s, q=4):
        items = np.stack([500 + rng.permutation(n_items + 3)[: s + q] for _ in range(t)])
        rat = rng.integers(1, 6, size=items.shape).astype(np.float32)
        sm = (rng.random((t, s)) < 0.8).astype(np.float32)
        return items[:, :s], rat[:, :s], sm, items[:, s:], np.ones((t, q), np.float32)

    return train, tasks


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


# the module-level core, static hyper-parameters and clipping of each padded baseline (defaults)
CORES = {
    "global_mean": (_global_core, (), True),
    "user_mean": (_user_core, (0.0,), True),
    "item_mean": (_item_core, (), True),
    "mf": (_mf_core, (5.0,), True),
}


@pytest.mark.parametrize("name", ["global_mean", "user_mean", "item_mean", "mf"])
def test_padded_baselines_equal_and_share_a_program(name, world):
    train, tasks = world
    model = make_baseline(name, steps=50) if name == "mf" else make_baseline(name)
    state = model.fit(*train)
    before = _run_predict_jit._cache_size()
    # one block and two blocks of PAD_TASKS tasks, support widths under one SUPPORT_MULTIPLE
    for t, s in ((5, 7), (11, 9), (70, 13)):
        s_item, s_rat, s_mask, q_item, q_mask = tasks(t, s)
        users = np.arange(t)
        pred = model.predict(state, s_item, s_rat, s_mask, q_item, q_mask, users)
        assert pred.shape == q_item.shape
        # before padding: the same jitted function on the raw shapes
        ref = _run_predict_jit(
            *CORES[name],
            state,
            s_item.astype(np.int32),
            s_rat,
            s_mask,
            q_item.astype(np.int32),
            q_mask,
        )
        np.testing.assert_array_equal(bits(pred), bits(ref))
    # three raw shapes for the references, one shared padded shape
    assert _run_predict_jit._cache_size() - before <= 3 + 1


def test_neighbour_features_pad_items_and_tasks(world):
    train, tasks = world
    u, i, r = train
    full = nb.fit_neighbours(u, i, r)
    fewer = nb.fit_neighbours(u[i != 500], i[i != 500], r[i != 500])  # one item less
    assert full.user.item_vocab.shape[0] == fewer.user.item_vocab.shape[0] + 1
    before = nb._features._cache_size()
    for state in (full, fewer):
        for t in (3, 130):  # one block, and two blocks of nb.PAD_TASKS
            s_item, s_rat, s_mask, q_item, _ = tasks(t, 6)
            users = 100 + np.arange(t) % 50  # some are fitted users (left out of their own)
            f = nb.neighbour_features(state, s_item, s_rat, s_mask, q_item, users)
            # reference: the same blocks, on the unpadded item axis
            ref = []
            for a in range(0, t, nb.PAD_TASKS):
                sl = slice(a, a + nb.PAD_TASKS)
                idx, known = nb.lookup(state.user_vocab, users[sl])
                own = np.where(known, idx, -1)
                pad = nb.PAD_TASKS - len(own)

                def p(x, pad=pad):
                    return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])

                out = nb._features(
                    state,
                    p(own),
                    p(s_item[sl].astype(np.int32)),
                    p(s_rat[sl]),
                    p(s_mask[sl]),
                    p(q_item[sl].astype(np.int32)),
                    30,
                    10.0,
                    32,
                )
                ref.append(np.asarray(out)[: len(own)])
            np.testing.assert_array_equal(bits(f), bits(np.concatenate(ref)))
    # both states (padded to one item width) and both task counts: one program (plus the
    # unpadded references above: one per state)
    assert nb._features._cache_size() - before <= 3


def _blocks_reference(fn, head, arrays):
    """``fn(*head, block..., task_chunk=32)`` on the same ``PAD_TASKS`` blocks as the library,
    without any padding of ``head``."""
    out, t = [], len(arrays[0])
    for a in range(0, t, nb.PAD_TASKS):
        sl = slice(a, a + nb.PAD_TASKS)
        pad = nb.PAD_TASKS - len(arrays[0][sl])
        blk = [np.concatenate([x[sl], np.zeros((pad, *x.shape[1:]), x.dtype)]) for x in arrays]
        dtypes = (np.int32, np.float32, np.float32, np.int32)
        blk = [b.astype(d) for b, d in zip(blk, dtypes)]
        out.append(np.asarray(fn(*head, *blk, 32))[: t - a])
    return np.concatenate(out)


def test_mf_and_new_item_features_share_a_program_across_fitted_shapes(world):
    train, tasks = world
    u, i, r = train
    model = make_baseline("mf", steps=50)
    # one item and some users fewer: the shapes other folds and seeds have
    keep = (i != 500) & (u < 130)
    states = [model.fit(u, i, r), model.fit(u[keep], i[keep], r[keep])]
    assert states[0].item_factors.shape[0] == states[1].item_factors.shape[0] + 1
    assert states[0].user_factors.shape[0] > states[1].user_factors.shape[0]
    nbs = [nb.fit_neighbours(u, i, r), nb.fit_neighbours(u[keep], i[keep], r[keep])]
    reg = np.float32(5.0)
    before = (nb._mf_block._cache_size(), nb._new_block._cache_size())
    found = []
    for st, ns in zip(states, nbs):
        for t in (3, 20):  # task counts within one block of nb.PAD_TASKS (blocks: the test above)
            s_item, s_rat, s_mask, q_item, _ = tasks(t, 6)
            for targets in (q_item, s_item):  # query targets, and support ones (left out)
                arrays = [s_item, s_rat, s_mask, targets]
                f = nb.mf_features(st, reg, *arrays)
                new = nb.new_item_features(ns, *arrays, (st, reg))
                found.append((st, ns, arrays, f, new))
    # both fitted shapes and task counts: one program per target width (query, support)
    assert nb._mf_block._cache_size() - before[0] <= 2
    assert nb._new_block._cache_size() - before[1] <= 2
    for st, ns, arrays, f, new in found:
        # references: the unpadded fitted state, every field of it
        ref = _blocks_reference(nb._mf_block, (st, reg), arrays)
        np.testing.assert_array_equal(bits(f), bits(ref))
        mus = (ns.user.mu, ns.item.mu)
        ref_new = _blocks_reference(nb._new_block, (mus, (st, reg)), arrays)
        np.testing.assert_array_equal(bits(new), bits(ref_new))


def test_padded_metrics_equal_the_unpadded_ones():
    rng = np.random.default_rng(0)
    before = mmetrics.per_task_metrics._cache_size()
    for t in (3, 40, 70):  # one block and two blocks of METRIC_CHUNK tasks
        y = rng.integers(1, 6, size=(t, 10)).astype(np.float32)
        mask = (rng.random((t, 10)) < 0.8).astype(np.float32)
        pred = (y + rng.normal(size=y.shape)).astype(np.float32)
        ex = Examples(x={}, y=y, mask=mask)
        tasks = Task(support=ex, query=ex, user=np.arange(t))
        summary, per_user = evaluate(pred, tasks, (1.0, 5.0), 3)
        values, valid = mmetrics.per_task_metrics(
            np.clip(pred, 1.0, 5.0), y, mask, k=3, rank_scores=pred
        )
        for m in values:
            assert summary[m] == float(mmetrics.summarize(values[m], valid[m]))
        assert per_user["mae"] == [float(v) for v in np.asarray(values["mae"], np.float64)]
    # the padded calls shared one program (the unpadded references compiled their own); "at
    # most": a test run earlier in the same process may have compiled a shape already
    assert mmetrics.per_task_metrics._cache_size() - before <= 1 + 3
