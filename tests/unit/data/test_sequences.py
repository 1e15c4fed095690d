"""Per-user sequences for pretraining: building, the held-out split and the masking of a batch."""

import jax
import numpy as np
import pandas as pd
import pytest

from metarec.data.sequences import Sequences, build_sequences, holdout_split, mask_items


def test_mask_items_fraction_padding_labels():
    B, L, p = 64, 200, 0.15
    rng = np.random.default_rng(0)
    items = rng.integers(1, 50, (B, L)).astype(np.int32)
    n = rng.integers(0, L + 1, B)
    n[0] = 0  # one empty sequence
    mask = (np.arange(L)[None] < n[:, None]).astype(np.float32)
    ratings = rng.integers(1, 6, (B, L)).astype(np.float32) * mask
    masked = jax.jit(mask_items, static_argnums=(4, 5, 6))
    b = masked(jax.random.PRNGKey(1), items, ratings, mask, p, 99, 0.0)
    lm = np.asarray(b.label_mask)
    assert np.all(lm[mask == 0] == 0), "padding was masked"
    frac = lm.sum() / mask.sum()
    assert abs(frac - p) < 0.01, frac
    assert np.all(lm.sum(1)[n > 0] >= 1)  # every non-empty sequence has a masked position
    assert lm[0].sum() == 0
    labels, inp = np.asarray(b.labels), np.asarray(b.items)
    np.testing.assert_array_equal(labels[lm > 0], items[lm > 0])
    assert np.all(labels[lm == 0] == 0)
    assert np.all(inp[lm > 0] == 99)
    np.testing.assert_array_equal(inp[lm == 0], items[lm == 0])
    assert np.all(np.asarray(b.ratings)[lm > 0] == 0)
    # last_prob = 1: exactly the last real item
    b = mask_items(jax.random.PRNGKey(2), items, ratings, mask, p, 99, 1.0)
    lm = np.asarray(b.label_mask)
    rows = np.flatnonzero(n > 0)
    assert np.all(lm.sum(1)[rows] == 1)
    assert np.all(lm[rows, n[rows] - 1] == 1)


def test_mask_items_at_least_one_for_short_sequences():
    items = np.array([[3, 4, 0, 0]] * 200, np.int32)
    mask = (items > 0).astype(np.float32)
    b = mask_items(jax.random.PRNGKey(0), items, mask * 4.0, mask, 0.01, 9)
    lm = np.asarray(b.label_mask)
    assert np.all(lm.sum(1) >= 1)
    # the forced position is uniform over the real ones
    assert 0.3 < lm[:, 0].mean() < 0.7


def test_build_sequences_time_order_truncation_and_oov():
    df = pd.DataFrame(
        {
            "user_id": [2, 2, 2, 2, 1, 1],
            "item_id": [10, 11, 12, 13, 10, 99],
            "rating": [1.0, 2.0, 3.0, 4.0, 5.0, 1.0],
            "timestamp": [40, 10, 30, 20, 5, 1],
        }
    )
    index = {10: 1, 11: 2, 12: 3, 13: 4}
    seqs = build_sequences(df, lambda ids: np.array([index.get(int(i), 0) for i in ids]), max_len=3)
    np.testing.assert_array_equal(seqs.user, [1, 2])
    np.testing.assert_array_equal(seqs.items, [[1, 0, 0], [4, 3, 1]])  # user 2: last 3 by time
    np.testing.assert_array_equal(seqs.ratings, [[5, 0, 0], [4, 3, 1]])
    np.testing.assert_array_equal(seqs.mask, [[1, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="lacks columns"):
        build_sequences(df.drop(columns="timestamp"), lambda i: i, 3)


def test_holdout_split_removes_last_item():
    items = np.array([[1, 2, 3, 0], [4, 5, 6, 7], [1, 2, 0, 0]], np.int32)
    mask = (items > 0).astype(np.float32)
    s = Sequences(items=items, ratings=mask * 3, mask=mask, user=np.arange(3))
    train, val = holdout_split(s, 0.99, seed=0, min_len=3)
    assert val.num_users == 2 and list(val.user) == [0, 1]
    np.testing.assert_array_equal(train.items, [[1, 2, 0, 0], [4, 5, 6, 0], [1, 2, 0, 0]])
    np.testing.assert_array_equal(train.mask.sum(1), [2, 3, 2])
    np.testing.assert_array_equal(val.items, items[:2])
    np.testing.assert_array_equal(s.items, items)  # input untouched
