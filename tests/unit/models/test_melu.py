"""Tests of the MeLU-style model (metarec.models.melu): shapes, hand-computed predictions, OOV
handling, feature dropout, parameter filters, jit/vmap, and MAML meta-gradients through it."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metarec import meta
from metarec.data.tasks import Examples, Task
from metarec.models import adapt_filter, adapt_mask, make_melu


@dataclass(frozen=True)
class Spec:
    """Stand-in for metarec.data.encode.FeatureSpec (duck typed)."""

    user_vocab: tuple = (3, 4, 5, 6)
    item_vocab: tuple = (7, 9)
    n_genres: int = 5


SPEC = Spec()


def jitted_melu(spec=SPEC, **cfg):
    """make_melu with jitted init/apply (one compilation per shape is much cheaper than eager
    op-by-op dispatch of the Flax module in tests)."""
    init, apply = make_melu(spec, **cfg)
    return jax.jit(init), jax.jit(apply, static_argnames=("train",))


# one shared standard model (its jitted init/apply compile once for the whole module)
STD_CFG = dict(embed_dim=4, hidden=(8, 8), feature_dropout=0.2)
STD_INIT, STD_APPLY = make_melu(SPEC, **STD_CFG)
STD_INIT_J, STD_APPLY_J = jitted_melu(SPEC, **STD_CFG)


def make_x(seed, n=6, spec=SPEC, lead=()):
    rng = np.random.default_rng(seed)
    user = np.stack([rng.integers(0, v, size=lead + (n,)) for v in spec.user_vocab], -1).astype(
        np.int32
    )
    item = np.stack([rng.integers(0, v, size=lead + (n,)) for v in spec.item_vocab], -1).astype(
        np.int32
    )
    genres = (rng.random(lead + (n, spec.n_genres)) < 0.4).astype(np.float32)
    offset = rng.uniform(2.5, 4.0, size=lead + (n,)).astype(np.float32)
    return {
        "user": jnp.asarray(user),
        "item": jnp.asarray(item),
        "genres": jnp.asarray(genres),
        "offset": jnp.asarray(offset),
    }


def test_param_shapes_and_output_shape():
    p = STD_INIT_J(jax.random.key(0))  # embed_dim=4, hidden=(8, 8)
    shapes = jax.tree_util.tree_map(jnp.shape, p)
    assert shapes["user_emb_2"]["embedding"] == (5, 4)
    assert shapes["item_emb_1"]["embedding"] == (9, 4)
    assert shapes["genre_proj"] == {"kernel": (5, 4)}  # bias-free
    assert shapes["mlp_0"]["kernel"] == (7 * 4, 8)  # 4 user + 2 item + genres
    assert shapes["mlp_1"]["kernel"] == (8, 8)
    assert shapes["out"]["kernel"] == (8, 1)
    out = STD_APPLY_J(p, make_x(0, n=6))
    assert out.shape == (6,) and out.dtype == jnp.float32
    # without the item-id embedding there is no item_emb_1 and a narrower first layer
    init2, _ = jitted_melu(SPEC, embed_dim=4, hidden=(8, 8), use_item_id=False)
    p2 = init2(jax.random.key(0))
    assert "item_emb_1" not in p2 and p2["mlp_0"]["kernel"].shape == (6 * 4, 8)


def test_linear_model_prediction_is_hand_computable():
    """With no hidden layer the model is linear: check the genre averaging (÷ count, 0 genres ->
    zero vector) and the residual offset by hand."""
    init, apply = jitted_melu(SPEC, embed_dim=3, hidden=())
    p = init(jax.random.key(1))
    x = make_x(1, n=4)
    genres = np.asarray(x["genres"]).copy()
    genres[0] = 0.0  # an item without genres
    genres[1] = [1, 1, 0, 0, 1]
    x["genres"] = jnp.asarray(genres)
    pred = np.asarray(apply(p, x))
    w = np.asarray(p["out"]["kernel"])[:, 0]
    for n in range(4):
        feats = [
            np.asarray(p[f"user_emb_{j}"]["embedding"])[int(x["user"][n, j])] for j in range(4)
        ]
        feats += [
            np.asarray(p[f"item_emb_{j}"]["embedding"])[int(x["item"][n, j])] for j in range(2)
        ]
        g = genres[n] @ np.asarray(p["genre_proj"]["kernel"]) / max(genres[n].sum(), 1.0)
        h = np.concatenate(feats + [g])
        expected = h @ w + float(p["out"]["bias"][0]) + float(x["offset"][n])
        assert pred[n] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # residual=False drops exactly the offset (same parameter structure)
    _, apply_nores = jitted_melu(SPEC, embed_dim=3, hidden=(), residual=False)
    np.testing.assert_allclose(
        pred - np.asarray(apply_nores(p, x)), np.asarray(x["offset"]), rtol=1e-5, atol=1e-5
    )


def test_out_of_vocabulary_ids_use_the_oov_row():
    apply = STD_APPLY_J
    p = STD_INIT_J(jax.random.key(2))
    x = make_x(2, n=5)
    item = np.asarray(x["item"]).copy()
    item[:, 1] = [0, 9, 100, -1, 3]  # 0 = OOV, 9 and 100 out of range, -1 invalid, 3 a real id
    x_bad = dict(x, item=jnp.asarray(item))
    item0 = item.copy()
    item0[:4, 1] = 0
    x_oov = dict(x, item=jnp.asarray(item0))
    out_bad, out_oov = apply(p, x_bad), apply(p, x_oov)
    assert np.all(np.isfinite(out_bad))
    np.testing.assert_allclose(out_bad, out_oov, rtol=1e-6)
    assert not np.isclose(
        float(out_bad[4]), float(apply(p, dict(x, item=jnp.asarray(item0 * 0)))[4])
    )


def test_feature_dropout_only_with_key_and_train_and_replaces_by_oov():
    init, apply = jitted_melu(SPEC, embed_dim=4, hidden=(8,), feature_dropout=(0, 0, 0, 0, 0, 0.5))
    p = init(jax.random.key(3))
    x = make_x(3, n=64)
    base = apply(p, x)
    np.testing.assert_array_equal(apply(p, x, train=True), base)  # no key -> no dropout
    np.testing.assert_array_equal(apply(p, x, key=jax.random.key(0)), base)  # not training -> none
    dropped = np.asarray(apply(p, x, key=jax.random.key(0), train=True))
    item_oov = np.asarray(x["item"]).copy()
    item_oov[:, 1] = 0
    oov = np.asarray(apply(p, dict(x, item=jnp.asarray(item_oov))))
    is_base = np.isclose(dropped, np.asarray(base), rtol=1e-6)
    is_oov = np.isclose(dropped, oov, rtol=1e-6)
    assert np.all(is_base | is_oov)  # each example either kept its item id or got the OOV row
    changed = ~is_base
    assert 15 < changed.sum() < 50  # ~half of 64 dropped
    # seeded: same key -> same ids, different key -> different ids
    np.testing.assert_array_equal(apply(p, x, key=jax.random.key(0), train=True), dropped)
    assert not np.array_equal(np.asarray(apply(p, x, key=jax.random.key(1), train=True)), dropped)


def test_adapt_filters_select_the_right_leaves():
    p = STD_INIT_J(jax.random.key(4))

    def selected(name):
        mask = adapt_mask(p, name)
        return {
            meta.path_to_str(path) for path, m in jax.tree_util.tree_leaves_with_path(mask) if m
        }

    assert selected("head") == {"out/kernel", "out/bias"}
    assert selected("decision") == {
        "mlp_0/kernel",
        "mlp_0/bias",
        "mlp_1/kernel",
        "mlp_1/bias",
        "out/kernel",
        "out/bias",
    }
    assert selected("all") == {
        meta.path_to_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)
    }
    assert selected("embeddings") == {f"user_emb_{j}/embedding" for j in range(4)} | {
        "item_emb_0/embedding",
        "item_emb_1/embedding",
        "genre_proj/kernel",
    }
    assert all(isinstance(m, bool) for m in jax.tree_util.tree_leaves(adapt_filter("decision")(p)))
    with pytest.raises(ValueError, match="allowed"):
        adapt_filter("mlp")


def test_jit_and_vmap_over_tasks():
    apply, apply_j = STD_APPLY, STD_APPLY_J
    p = STD_INIT_J(jax.random.key(5))
    xs = make_x(5, n=6, lead=(3,))  # 3 tasks
    out_v = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(p, xs)
    for t in range(3):
        xt = jax.tree_util.tree_map(lambda a, t=t: a[t], xs)
        np.testing.assert_allclose(out_v[t], apply_j(p, xt), rtol=1e-5, atol=1e-6)
    x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    np.testing.assert_allclose(apply(p, x0), out_v[0], rtol=1e-5, atol=1e-6)  # eager == jit
    keys = jax.random.split(jax.random.key(0), 3)
    drop = jax.jit(jax.vmap(lambda x, k: apply(p, x, key=k, train=True)))(xs, keys)
    assert drop.shape == (3, 6) and np.all(np.isfinite(drop))
    assert not np.allclose(drop, out_v)


def test_bad_spec_and_inputs_give_clear_errors():
    with pytest.raises(TypeError, match="user_vocab"):
        make_melu(object())
    with pytest.raises(ValueError, match="feature_dropout"):
        make_melu(SPEC, feature_dropout=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_melu(SPEC, feature_dropout=1.0)
    with pytest.raises(ValueError, match="item-id field"):
        make_melu(Spec(item_vocab=(7,)))
    p = STD_INIT_J(jax.random.key(0))
    x = make_x(0)
    with pytest.raises(ValueError, match="declares 4 user"):
        STD_APPLY_J(p, dict(x, user=x["user"][:, :3]))


@pytest.mark.parametrize("dropout", [0.0, pytest.param(0.3, marks=pytest.mark.slow)])
def test_maml_meta_gradient_through_melu_matches_directional_finite_differences(dropout):
    """Second-order MAML with MeLU's decision-layer adaptation, optionally with feature dropout (a
    fixed key makes the loss deterministic): the meta-gradient's projection on random directions
    equals central finite differences (float64)."""
    with jax.enable_x64(True):
        init, apply = make_melu(SPEC, embed_dim=3, hidden=(5,), feature_dropout=dropout)
        p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), init(jax.random.key(6)))
        rng = np.random.default_rng(6)

        def examples(seed, n):
            x = make_x(seed, n=n)
            x = dict(
                x, genres=x["genres"].astype(jnp.float64), offset=x["offset"].astype(jnp.float64)
            )
            return Examples(x=x, y=jnp.asarray(rng.uniform(1, 5, n)), mask=jnp.ones(n, jnp.float64))

        task = Task(support=examples(7, 8), query=examples(8, 6), user=jnp.asarray(0))
        learner = meta.maml(
            apply, inner_steps=2, inner_lr=0.05, adapt_mask=adapt_filter("decision")
        )
        key = jax.random.key(0)
        task_grad = jax.jit(learner.task_grad)  # one compilation, reused for the FD evaluations

        def loss_fn(q):
            return task_grad(q, task, key)[0]

        loss, g = task_grad(p, task, key)
        flat_g, unravel = ravel_pytree(g)
        flat_p, _ = ravel_pytree(p)
        # embeddings (frozen in the inner loop) still get meta-gradients
        assert np.abs(np.asarray(g["user_emb_0"]["embedding"])).sum() > 0
        eps = 1e-5
        for _ in range(3):
            v = rng.normal(size=flat_p.shape[0])
            v /= np.linalg.norm(v)
            fd = (
                float(loss_fn(unravel(flat_p + eps * v)))
                - float(loss_fn(unravel(flat_p - eps * v)))
            ) / (2 * eps)
            assert float(flat_g @ v) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_context_vector_is_an_adaptable_user_factor():
    """CAVIA-style context: a zero-initialised parameter; only it adapts under the "context" filter,
    its gradient is non-zero, and adapting it alone fits a user's support set better."""
    from metarec.data import make_synthetic_tasks

    tasks, spec, _ = make_synthetic_tasks(
        seed=0, n_users=4, n_items=60, n_support=20, n_query=5, noise=0.0
    )
    init_fn, apply_fn = make_melu(spec, embed_dim=8, hidden=(16,), context_dim=6)
    params = jax.jit(init_fn)(jax.random.PRNGKey(0))
    assert params["context"].shape == (6,) and not np.any(params["context"])
    mask = adapt_mask(params, "context")
    flat = jax.tree_util.tree_leaves_with_path(mask)
    assert [jax.tree_util.keystr(p) for p, m in flat if m] == ["['context']"]
    both = adapt_mask(params, "decision+context")
    assert both["context"] and both["out"]["kernel"] and not both["context_proj"]["kernel"]
    no_ctx_init, _ = make_melu(spec, embed_dim=8, hidden=(16,))
    assert "context" not in no_ctx_init(jax.random.PRNGKey(0))

    task = jax.tree_util.tree_map(lambda a: jnp.asarray(a[1]), tasks)
    objective = meta.make_objective(apply_fn)
    g = jax.jit(jax.grad(objective))(params, task.support)
    assert float(jnp.abs(g["context"]).sum()) > 0
    adapted = jax.jit(lambda p, s: meta.adapt(p, s, objective, steps=20, lr=0.5, mask=mask))(
        params, task.support
    )
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), params, adapted)
    assert (
        changed["context"]
        and not changed["out"]["kernel"]
        and not changed["context_proj"]["kernel"]
    )
    loss = jax.jit(objective)
    assert float(loss(adapted, task.support)) < 0.9 * float(loss(params, task.support))


def test_residual_bound_keeps_predictions_within_offset_plus_minus_b():
    from metarec.data import make_synthetic_tasks

    tasks, spec, _ = make_synthetic_tasks(seed=0, n_users=2, n_items=40, n_support=10, n_query=5)
    x = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), tasks.support.x)
    init_fn, apply_fn = make_melu(spec, embed_dim=4, hidden=(8,), residual_bound=2.0)
    # absurd init
    params = jax.tree_util.tree_map(lambda p: 1e4 * p, init_fn(jax.random.PRNGKey(0)))
    pred = apply_fn(params, x)
    assert np.all(np.isfinite(pred)) and np.all(np.abs(pred - x["offset"]) <= 2.0 + 1e-5)
    assert np.abs(pred - x["offset"]).max() > 1.9  # saturates, but is not clipped to the offset
    unbounded_init, unbounded = make_melu(spec, embed_dim=4, hidden=(8,))
    assert np.abs(unbounded(params, x) - x["offset"]).max() > 100
