"""Masked-item pretraining learns planted next-item cycles (full and sampled softmax), is seeded,
and its held-out next-item evaluation is earned (a random encoder is near chance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.data.sequences import Sequences, holdout_split
from metarec.models.transformer import EncoderConfig, init_encoder, next_item_logits
from metarec.training.next_item import evaluate_next_item
from metarec.training.pretrain import PretrainConfig, pretrain

V, L = 24, 10


def _cycle_sequences(U=192, seed=0):
    """Every user walks one planted cycle through all items (in a random order) from a random
    start item; returns the sequences and the successor table ``nxt``."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.arange(1, V))
    nxt = np.zeros(V, int)
    nxt[perm] = np.roll(perm, -1)
    items = np.zeros((U, L), np.int32)
    for u in range(U):
        s = rng.integers(1, V)
        for t in range(L):
            items[u, t] = s
            s = nxt[s]
    n = rng.integers(4, L + 1, U)
    mask = (np.arange(L)[None] < n[:, None]).astype(np.float32)
    items = items * mask.astype(np.int32)
    ratings = (mask * rng.integers(1, 6, (U, L))).astype(np.float32)
    return Sequences(items=items, ratings=ratings, mask=mask, user=np.arange(U)), nxt


ENC = EncoderConfig(num_items=V, max_len=L, width=32, depth=1, heads=2, dropout_rate=0.0)


@pytest.fixture(scope="module")
def trained():
    seqs, nxt = _cycle_sequences()
    train, val = holdout_split(seqs, 0.25, seed=0)
    pcfg = PretrainConfig(epochs=40, batch_size=64, lr=5e-3, seed=0)
    params, hist = pretrain(train, ENC, pcfg, val=val)
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
    items = jnp.asarray(np.stack(cols, 1).astype(np.int32))
    logits = next_item_logits(params, ENC, items, jnp.full(items.shape, 4.0), jnp.ones(items.shape))
    pred = np.asarray(jnp.argmax(logits, -1))
    assert np.mean(pred == nxt[cols[-1]]) > 0.9
    assert np.all((pred > 0) & (pred < V))  # never OOV or [MASK]


def test_untrained_model_does_not_recover_cycles(trained):
    """The accuracy above is earned: a random encoder is near chance."""
    _, _, val, _ = trained
    m = evaluate_next_item(init_encoder(jax.random.PRNGKey(3), ENC), ENC, val)
    assert m["acc"] < 0.3


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_sampled_softmax_learns_too():
    seqs, nxt = _cycle_sequences(U=192, seed=1)
    train, val = holdout_split(seqs, 0.25, seed=1)
    pcfg = PretrainConfig(epochs=40, batch_size=64, lr=5e-3, num_negatives=8, seed=1)
    _, hist = pretrain(train, ENC, pcfg, val=val)
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"], (hist[0], hist[-1])
    assert hist[-1]["val_hr@10"] > 0.8, hist[-1]


def test_pretrain_is_seeded():
    seqs, _ = _cycle_sequences(U=64, seed=2)
    cfg = PretrainConfig(epochs=2, batch_size=32, seed=5)
    p1, h1 = pretrain(seqs, ENC, cfg)
    p2, h2 = pretrain(seqs, ENC, cfg)
    assert h1 == h2
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), p1, p2)
    assert all(jax.tree_util.tree_leaves(same))
