"""Tests of the history encoder (padding / causal masks, jit/vmap) and the Transformer rater."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.data.tasks import Examples, Task
from metarec.models.transformer import (
    EncoderConfig,
    HistoryEncoder,
    RaterConfig,
    adapt_filter,
    add_history,
    append_mask_token,
    attention_mask,
    make_transformer_rater,
    pool,
)

V, L = 20, 8


def _enc(causal=False, **kw):
    cfg = EncoderConfig(
        num_items=V, max_len=L, width=16, depth=2, heads=2, dropout_rate=0.0, causal=causal, **kw
    )
    model = HistoryEncoder(cfg)
    params = jax.jit(model.init)(
        jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32), jnp.zeros((1, L)), jnp.ones((1, L))
    )
    return cfg, model, params


class _Jitted:
    """model.apply under jit (eager flax is slow on a loaded CPU)."""

    def __init__(self, model):
        self.apply = jax.jit(model.apply)


def _batch(seed=0, B=3):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, V, (B, L)).astype(np.int32)
    ratings = rng.integers(1, 6, (B, L)).astype(np.float32)
    n = np.array([5, 8, 1][:B])
    mask = (np.arange(L)[None] < n[:, None]).astype(np.float32)
    return items, ratings, mask


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(num_items=5, width=10, heads=3)
    with pytest.raises(ValueError, match="num_items"):
        EncoderConfig(num_items=1)
    with pytest.raises(ValueError, match="unknown EncoderConfig"):
        EncoderConfig.from_dict({"num_items": 5, "bogus": 1})


def test_attention_mask_shape_and_values():
    m = jnp.array([1.0, 1.0, 0.0])
    am = attention_mask(m, causal=False)
    assert am.shape == (1, 3, 3)
    np.testing.assert_array_equal(am[0], [[1, 1, 0]] * 3)
    ac = attention_mask(m, causal=True)
    np.testing.assert_array_equal(ac[0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_never_influences_outputs(causal):
    cfg, model, params = _enc(causal)
    items, ratings, mask = _batch()
    h = model.apply(params, items, ratings, mask)
    rng = np.random.default_rng(1)
    items2 = np.where(mask > 0, items, rng.integers(0, V + 1, items.shape)).astype(np.int32)
    ratings2 = np.where(mask > 0, ratings, rng.integers(0, 6, items.shape)).astype(np.float32)
    assert not np.array_equal(items, items2)
    h2 = model.apply(params, items2, ratings2, mask)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h2), atol=1e-6)
    # padded outputs are zero, real ones are not
    assert np.all(np.asarray(h)[mask == 0] == 0)
    assert np.all(np.abs(np.asarray(h)[mask > 0]).sum(-1) > 0)
    # ... and the real tokens do matter (the test can fail)
    items3 = items.copy()
    items3[0, 0] = (items3[0, 0] % (V - 1)) + 1
    h3 = model.apply(params, items3, ratings, mask)
    assert not np.allclose(np.asarray(h3)[0, 1:5], np.asarray(h)[0, 1:5])


def test_causal_masking_future_never_influences_past():
    for causal in (True, False):
        cfg, model, params = _enc(causal)
        items, ratings, mask = _batch()
        h = np.asarray(model.apply(params, items, ratings, mask))
        j = 3
        items2 = items.copy()
        items2[:, j] = (items2[:, j] % (V - 1)) + 1
        ratings2 = ratings.copy()
        ratings2[:, j] = 6 - ratings2[:, j] + 0.0
        h2 = np.asarray(model.apply(params, items2, ratings2, mask))
        row = 1  # fully real row
        if causal:
            np.testing.assert_allclose(h[row, :j], h2[row, :j], atol=1e-6)
        else:
            assert not np.allclose(h[row, :j], h2[row, :j], atol=1e-6)
        assert not np.allclose(h[row, j:], h2[row, j:])


def test_jit_and_vmap_match():
    cfg, model, params = _enc(causal=True)
    items, ratings, mask = _batch()
    plain = HistoryEncoder(cfg)

    def f(i, r, m):
        return plain.apply(params, i, r, m)

    full = np.asarray(f(items, ratings, mask))
    np.testing.assert_allclose(np.asarray(jax.jit(f)(items, ratings, mask)), full, atol=1e-5)
    fj = jax.jit(f)
    loop = np.stack([np.asarray(fj(items[b], ratings[b], mask[b])) for b in range(3)])
    np.testing.assert_allclose(loop, full, atol=1e-5)
    vm = jax.vmap(f)(items, ratings, mask)
    np.testing.assert_allclose(np.asarray(vm), full, atol=1e-5)


def test_too_long_history_errors():
    cfg, model, params = _enc()
    with pytest.raises(ValueError, match="max_len"):
        model.apply(
            params, jnp.zeros((1, L + 1), jnp.int32), jnp.zeros((1, L + 1)), jnp.ones((1, L + 1))
        )


def test_pool_hand_computed():
    h = jnp.arange(12.0).reshape(1, 4, 3)
    m = jnp.array([[1.0, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(pool(h, m, "mean"), [[1.5, 2.5, 3.5]])
    np.testing.assert_allclose(pool(h, m, "last"), [[3.0, 4.0, 5.0]])
    np.testing.assert_allclose(pool(h, jnp.zeros((1, 4)), "mean"), [[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(pool(h, jnp.zeros((1, 4)), "last"), [[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="pool mode"):
        pool(h, m, "max")


def test_append_mask_token():
    items = jnp.array([[1, 2, 0], [1, 2, 3]])
    mask = (items > 0).astype(jnp.float32)
    it, rt, mk, pos = append_mask_token(items, mask * 5, mask, 9)
    np.testing.assert_array_equal(it, [[1, 2, 9], [2, 3, 9]])
    np.testing.assert_array_equal(mk, [[1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(rt, [[5, 5, 0], [5, 5, 0]])
    np.testing.assert_array_equal(pos, [2, 2])


# ---------------------------------------------------------------------------------------------
# Rater
# ---------------------------------------------------------------------------------------------

G, NY = 3, 4


def _tasks(T=4, S=6, Q=3, seed=0):
    rng = np.random.default_rng(seed)

    def ex(n, real):
        x = {
            "user": rng.integers(0, 3, (T, n, 4)).astype(np.int32),
            "item": np.stack([rng.integers(0, NY, (T, n)), rng.integers(0, V, (T, n))], -1).astype(
                np.int32
            ),
            "genres": (rng.random((T, n, G)) < 0.4).astype(np.float32),
            "offset": np.full((T, n), 3.5, np.float32),
        }
        mask = (np.arange(n)[None] < real[:, None]).astype(np.float32)
        y = rng.integers(1, 6, (T, n)).astype(np.float32) * mask
        return Examples(x=x, y=y, mask=mask)

    sup = ex(S, np.array([6, 4, 2, 5])[:T])
    # scramble the support padding into the middle for one task: add_history must compact it
    sup.mask[1] = np.array([1, 0, 1, 1, 0, 1], np.float32)
    qry = ex(Q, np.full(T, Q))
    return Task(support=sup, query=qry, user=np.arange(T, dtype=np.int32))


def test_add_history():
    t = _tasks()
    th = add_history(t)
    for ex in (th.support, th.query):
        n = ex.y.shape[-1]
        assert ex.x["hist_item"].shape == (4, n, 6)
        # identical rows
        assert np.all(ex.x["hist_item"] == ex.x["hist_item"][:, :1])
        assert np.all(ex.x["hist_mask"] == ex.x["hist_mask"][:, :1])
    hm = th.query.x["hist_mask"][1, 0]
    np.testing.assert_array_equal(hm, [1, 1, 1, 1, 0, 0])
    real = t.support.mask[1] > 0
    np.testing.assert_array_equal(
        th.query.x["hist_item"][1, 0, :4], t.support.x["item"][1, real, 1]
    )
    np.testing.assert_array_equal(th.query.x["hist_rating"][1, 0, :4], t.support.y[1, real])
    assert np.all(th.query.x["hist_rating"][1, 0, 4:] == 0)
    # same result on jax leaves
    tj = add_history(jax.tree_util.tree_map(jnp.asarray, t))
    np.testing.assert_array_equal(np.asarray(tj.query.x["hist_item"]), th.query.x["hist_item"])


_RATERS = {}


def _rater(lora=0, **kw):
    """Cached (config, (jitted init, jitted apply)) so that tests share compilations."""
    key = (lora, tuple(sorted(kw.items())))
    if key not in _RATERS:
        _RATERS[key] = _make_rater(lora, **kw)
    return _RATERS[key]


def _make_rater(lora=0, **kw):
    enc = EncoderConfig(num_items=V, max_len=L, width=16, depth=2, heads=2, dropout_rate=0.0)
    rc = RaterConfig(
        encoder=enc, n_years=NY, n_genres=G, item_dim=8, head_hidden=(16,), lora_rank=lora, **kw
    )
    init_fn, apply_fn = make_transformer_rater(rc)
    return rc, (jax.jit(init_fn), jax.jit(apply_fn))


def test_rater_shapes_jit_vmap():
    rc, (init_fn, apply_fn) = _rater()
    t = add_history(_tasks())
    params = init_fn(jax.random.PRNGKey(0))
    x0 = jax.tree_util.tree_map(lambda a: a[0], t.query.x)
    out = apply_fn(params, x0)
    assert out.shape == (3,)
    vm = jax.jit(jax.vmap(apply_fn, in_axes=(None, 0)))(params, t.query.x)
    loop = np.stack(
        [
            np.asarray(apply_fn(params, jax.tree_util.tree_map(lambda a, i=i: a[i], t.query.x)))
            for i in range(4)
        ]
    )
    np.testing.assert_allclose(np.asarray(vm), loop, atol=1e-5)
    # the history matters: changing a support rating changes query predictions
    t2 = _tasks()
    t2.support.y[0, 0] = 6 - t2.support.y[0, 0] if t2.support.y[0, 0] != 3 else 5.0
    vm2 = jax.vmap(apply_fn, in_axes=(None, 0))(params, add_history(t2).query.x)
    assert not np.allclose(np.asarray(vm2)[0], np.asarray(vm)[0])
    np.testing.assert_allclose(np.asarray(vm2)[1:], np.asarray(vm)[1:], atol=1e-6)


def test_rater_offset_and_content_errors():
    rc, (init_fn, apply_fn) = _rater(content_dim=5)
    t = add_history(_tasks())
    x0 = jax.tree_util.tree_map(lambda a: a[0], t.query.x)
    params = init_fn(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="content"):
        apply_fn(params, x0)
    x0 = dict(x0, content=np.ones((3, 5), np.float32))
    assert apply_fn(params, x0).shape == (3,)


def test_lora_starts_as_identity_and_filters():
    rc0, (init0, apply0) = _rater(lora=0)
    rc2, (init2, apply2) = _rater(lora=2)
    p0 = init0(jax.random.PRNGKey(0))
    p2 = init2(jax.random.PRNGKey(0))

    # copy the shared weights into the LoRA model: B == 0 -> identical predictions
    def copy(path, leaf):
        d = p0
        for k in path:
            key = k.key
            if key not in d:
                return leaf
            d = d[key]
        return d

    p2c = jax.tree_util.tree_map_with_path(copy, p2)
    x0 = jax.tree_util.tree_map(lambda a: a[0], add_history(_tasks()).query.x)
    np.testing.assert_allclose(np.asarray(apply2(p2c, x0)), np.asarray(apply0(p0, x0)), atol=1e-6)

    def flat(m):
        return {
            "/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(m)
        }

    lora = flat(adapt_filter("lora")(p2))
    assert lora and all(
        v == (k.endswith("lora_a") or k.endswith("lora_b")) for k, v in lora.items()
    )
    head = flat(adapt_filter("head")(p0))
    assert all(v == ("/head_" in k) for k, v in head.items())
    hb = flat(adapt_filter("head+last_block", depth=2)(p0))
    assert all(v == ("/head_" in k or "encoder/block_1/" in k) for k, v in hb.items())
    assert any("encoder/block_0/" in k and not v for k, v in hb.items())
    with pytest.raises(ValueError, match="selects no parameter"):
        adapt_filter("lora")(p0)
    with pytest.raises(ValueError, match="adapt mode"):
        adapt_filter("nope")


def test_rater_head_adaptation_reduces_support_loss():
    """Gradient steps on the head only (what a meta-learner's inner loop does) fit the support set
    and leave the encoder untouched."""
    rc, (init_fn, apply_fn) = _rater()
    t = add_history(_tasks())
    params = init_fn(jax.random.PRNGKey(0))
    sup = jax.tree_util.tree_map(lambda a: a[0], t.support)
    mask = adapt_filter("head")(params)

    def loss(p):
        pred = apply_fn(p, sup.x)
        return jnp.sum(sup.mask * (pred - sup.y) ** 2) / sup.mask.sum()

    @jax.jit
    def step(p):
        gg = jax.grad(loss)(p)
        return jax.tree_util.tree_map(lambda a, gi, m: a - 0.03 * gi if m else a, p, gg, mask)

    l0 = loss(params)
    p = params
    for _ in range(60):
        p = step(p)
    assert loss(p) < 0.8 * l0, (float(loss(p)), float(l0))
    enc_same = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.all(a == b)), p["params"]["encoder"], params["params"]["encoder"]
    )
    assert all(jax.tree_util.tree_leaves(enc_same))
