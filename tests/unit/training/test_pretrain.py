"""Tests of masked-item pretraining: masking logic, sequence building, learning planted cycles,
next-item metrics and the checkpoint round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from metarec.models.transformer import EncoderConfig, RaterConfig, make_transformer_rater
from metarec.pretrain import (
    PretrainConfig,
    Sequences,
    append_mask_token,
    build_sequences,
    evaluate_next_item,
    holdout_split,
    load_pretrained,
    mask_items,
    next_item_logits,
    pretrain,
    ranking_metrics,
    save_pretrained,
)


def test_mask_items_fraction_padding_labels():
    B, L, p = 64, 200, 0.15
    rng = np.random.default_rng(0)
    items = rng.integers(1, 50, (B, L)).astype(np.int32)
    n = rng.integers(0, L + 1, B)
    n[0] = 0  # one empty sequence
    mask = (np.arange(L)[None] < n[:, None]).astype(np.float32)
    ratings = rng.integers(1, 6, (B, L)).astype(np.float32) * mask
    b = jax.jit(mask_items, static_argnums=(4, 5, 6))(jax.random.PRNGKey(1), items, ratings, mask, p, 99, 0.0)
    lm = np.asarray(b.label_mask)
    assert np.all(lm[mask == 0] == 0), "padding was masked"
    frac = lm.sum() / mask.sum()
    assert abs(frac - p) < 0.01, frac
    assert np.all(lm[1:][n[1:] > 0].sum(-1) >= 1) if False else np.all(lm.sum(1)[n > 0] >= 1)
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


def test_append_mask_token():
    items = jnp.array([[1, 2, 0], [1, 2, 3]])
    mask = (items > 0).astype(jnp.float32)
    it, rt, mk, pos = append_mask_token(items, mask * 5, mask, 9)
    np.testing.assert_array_equal(it, [[1, 2, 9], [2, 3, 9]])
    np.testing.assert_array_equal(mk, [[1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(rt, [[5, 5, 0], [5, 5, 0]])
    np.testing.assert_array_equal(pos, [2, 2])


def test_ranking_metrics_hand_computed():
    scores = jnp.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    rel = jnp.array([[0, 1, 0, 1], [0, 0, 0, 0]], bool)
    m = ranking_metrics(scores, rel, k=2)
    # row 0: top-2 = items 0, 1 -> hit at rank 2; 2 relevant, min(k, 2) = 2
    np.testing.assert_allclose(m["hr@2"], [1, 0])
    np.testing.assert_allclose(m["recall@2"], [0.5, 0])
    np.testing.assert_allclose(m["ndcg@2"], [(1 / np.log2(3)) / (1 + 1 / np.log2(3)), 0], rtol=1e-6)
    np.testing.assert_allclose(m["acc"], [0, 0])


# ---------------------------------------------------------------------------------------------
# Learning a planted pattern: deterministic next-item cycles
# ---------------------------------------------------------------------------------------------

V, L = 24, 10


def _cycle_sequences(U=192, seed=0):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.arange(1, V))
    nxt = np.zeros(V, int)
    nxt[perm] = np.roll(perm, -1)  # one cycle through all items, in a random order
    items = np.zeros((U, L), np.int32)
    for u in range(U):
        s = rng.integers(1, V)
        for t in range(L):
            items[u, t] = s
            s = nxt[s]
    n = rng.integers(4, L + 1, U)
    mask = (np.arange(L)[None] < n[:, None]).astype(np.float32)
    items = items * mask.astype(np.int32)
    ratings = mask * rng.integers(1, 6, (U, L))
    return Sequences(items=items, ratings=ratings.astype(np.float32), mask=mask, user=np.arange(U)), nxt


ENC = EncoderConfig(num_items=V, max_len=L, width=32, depth=1, heads=2, dropout_rate=0.0)


@pytest.fixture(scope="module")
def trained():
    seqs, nxt = _cycle_sequences()
    train, val = holdout_split(seqs, 0.25, seed=0)
    params, hist = pretrain(train, ENC, PretrainConfig(epochs=40, batch_size=64, lr=5e-3, seed=0), val=val)
    return params, hist, val, nxt


def test_pretraining_recovers_planted_cycles(trained):
    params, hist, val, nxt = trained
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"], (hist[0], hist[-1])
    # held-out next item: the planted successor is ranked first for (almost) every validation user
    assert hist[-1]["val_acc"] > 0.9, hist[-1]
    assert hist[-1]["val_hr@10"] > 0.95
    # and it continues a 4-item walk from any start item
    cols = [np.arange(1, V)]
    for _ in range(3):
        cols.append(nxt[cols[-1]])
    items = np.stack(cols, 1).astype(np.int32)
    logits = next_item_logits(params, ENC, jnp.asarray(items), jnp.full(items.shape, 4.0), jnp.ones(items.shape))
    pred = np.asarray(jnp.argmax(logits, -1))
    assert np.mean(pred == nxt[cols[-1]]) > 0.9
    assert np.all((pred > 0) & (pred < V))  # never OOV or [MASK]


def test_untrained_model_does_not_recover_cycles(trained):
    """The accuracy above is earned: a random encoder is near chance."""
    _, _, val, _ = trained
    from metarec.pretrain import init_encoder

    m = evaluate_next_item(init_encoder(jax.random.PRNGKey(3), ENC), ENC, val)
    assert m["acc"] < 0.3


def test_sampled_softmax_learns_too():
    seqs, nxt = _cycle_sequences(U=192, seed=1)
    train, val = holdout_split(seqs, 0.25, seed=1)
    _, hist = pretrain(
        train, ENC, PretrainConfig(epochs=40, batch_size=64, lr=5e-3, num_negatives=8, seed=1), val=val
    )
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"], (hist[0], hist[-1])
    assert hist[-1]["val_hr@10"] > 0.8, hist[-1]


def test_pretrain_is_seeded():
    seqs, _ = _cycle_sequences(U=64, seed=2)
    cfg = PretrainConfig(epochs=2, batch_size=32, seed=5)
    p1, h1 = pretrain(seqs, ENC, cfg)
    p2, h2 = pretrain(seqs, ENC, cfg)
    assert h1 == h2
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), p1, p2)))


def test_checkpoint_round_trip(trained, tmp_path):
    params, hist, val, _ = trained
    ids = np.arange(V) * 10
    path = save_pretrained(str(tmp_path / "ckpt"), params, ENC, item_ids=ids, metadata={"hist": hist[-1]})
    with pytest.raises(FileExistsError):
        save_pretrained(path, params, ENC)
    cfg, loaded = load_pretrained(path)
    assert cfg == ENC
    x = (jnp.asarray(val.items), jnp.asarray(val.ratings), jnp.asarray(val.mask))
    np.testing.assert_array_equal(
        np.asarray(next_item_logits(params, ENC, *x)), np.asarray(next_item_logits(loaded, cfg, *x))
    )
    _, _, info = load_pretrained(path, with_metadata=True)
    np.testing.assert_array_equal(info["item_ids"], ids)
    assert info["metadata"]["hist"]["epoch"] == hist[-1]["epoch"]
    # the rater picks the encoder weights up from the checkpoint
    rc = RaterConfig(encoder=ENC, n_years=3, n_genres=2, item_dim=4, head_hidden=(8,))
    init_fn, _ = make_transformer_rater(rc, init_from=path)
    rp = init_fn(jax.random.PRNGKey(0))
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), rp["params"]["encoder"], loaded["params"])
    assert all(jax.tree_util.tree_leaves(same))
    bad = RaterConfig(encoder=EncoderConfig(num_items=V, max_len=L, width=16, heads=2), n_years=3, n_genres=2)
    with pytest.raises(ValueError, match="config"):
        make_transformer_rater(bad, init_from=path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_pretrained(str(tmp_path / "nothing"))
