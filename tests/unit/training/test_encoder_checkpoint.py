"""Encoder checkpoints round-trip (params, config, item ids, metadata), and the rater takes the
loaded encoder parameters (a model never reads the checkpoint itself)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.models.transformer import (
    EncoderConfig,
    RaterConfig,
    init_encoder,
    make_transformer_rater,
    next_item_logits,
)
from metarec.training.encoder_checkpoint import load_pretrained, same_item_vocab, save_pretrained
from tests.conftest import random_sequences

V, L = 24, 10
ENC = EncoderConfig(num_items=V, max_len=L, width=32, depth=1, heads=2, dropout_rate=0.0)


def test_checkpoint_round_trip(tmp_path):
    # jitted: one program each instead of compiling every op of the model eagerly
    params = jax.jit(init_encoder, static_argnums=1)(jax.random.PRNGKey(0), ENC)
    logits = jax.jit(next_item_logits, static_argnums=1)
    val = random_sequences(n_users=16, num_items=V, max_len=L, seed=1)
    last = {"epoch": 3, "loss": 1.5}
    ids = np.arange(V) * 10
    path = str(tmp_path / "ckpt")
    path = save_pretrained(path, params, ENC, item_ids=ids, metadata={"hist": last})
    with pytest.raises(FileExistsError):
        save_pretrained(path, params, ENC)
    cfg, loaded = load_pretrained(path)
    assert cfg == ENC
    x = (jnp.asarray(val.items), jnp.asarray(val.ratings), jnp.asarray(val.mask))
    np.testing.assert_array_equal(
        np.asarray(logits(params, ENC, *x)), np.asarray(logits(loaded, cfg, *x))
    )
    _, _, info = load_pretrained(path, with_metadata=True)
    np.testing.assert_array_equal(info["item_ids"], ids)
    assert info["metadata"]["hist"]["epoch"] == last["epoch"]
    # the rater takes the loaded encoder weights
    rc = RaterConfig(encoder=ENC, n_years=3, n_genres=2, item_dim=4, head_hidden=(8,))
    init_fn, _ = make_transformer_rater(rc, pretrained=loaded)
    rp = jax.jit(init_fn)(jax.random.PRNGKey(0))
    same = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.all(a == b)), rp["params"]["encoder"], loaded["params"]
    )
    assert all(jax.tree_util.tree_leaves(same))
    small = EncoderConfig(num_items=V, max_len=L, width=16, heads=2)
    bad = RaterConfig(encoder=small, n_years=3, n_genres=2)
    with pytest.raises(ValueError, match="config"):
        make_transformer_rater(bad, pretrained=loaded)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_pretrained(str(tmp_path / "nothing"))


def test_same_item_vocab():
    class _Vocab:
        index = {"10": 1, "30": 2}

    class _Spec:
        item_vocab = (5, 4)

    class _Encoder:
        vocabs = {"item_id": _Vocab()}
        spec = _Spec()

    assert same_item_vocab(np.array([-1, 10, 30, -1]), _Encoder())
    assert not same_item_vocab(np.array([-1, 30, 10, -1]), _Encoder())
    assert same_item_vocab(None, _Encoder())
