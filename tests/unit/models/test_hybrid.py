"""The hybrid CF model: MF item tables, the content fallback, and fold-in as its inner loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.baselines.mf import mf_fold_in
from metarec.data.encode import FeatureSpec
from metarec.data.tasks import Examples
from metarec.meta import inner
from metarec.models import hybrid

SPEC = FeatureSpec(user_vocab=(8, 3, 5, 10), item_vocab=(6, 20), n_genres=4)
DIM = 3


def make_x(seed, items, offset=3.5):
    rng = np.random.default_rng(seed)
    n = len(items)
    user = np.tile(rng.integers(0, [8, 3, 5, 10]), (n, 1))
    return {
        "user": jnp.asarray(user, jnp.int32),
        "item": jnp.asarray(np.stack([rng.integers(0, 6, n), items], 1), jnp.int32),
        "genres": jnp.asarray(rng.integers(0, 2, (n, 4)), jnp.float32),
        "offset": jnp.full((n,), offset, jnp.float32),
    }


def filled(seed=0, **kw):
    init, apply = hybrid.make_hybrid(SPEC, dim=DIM, embed_dim=4, **kw)
    rng = np.random.default_rng(seed)
    rows = np.arange(1, 15)  # items 1..14 known, 15..19 and 0 are not
    bias = rng.normal(0, 0.3, len(rows))
    fac = rng.normal(0, 0.4, (len(rows), DIM))
    params = hybrid.with_item_tables(init(jax.random.PRNGKey(seed)), rows, bias, fac, 3.6)
    return params, apply, rows, bias, fac


def test_known_items_are_predicted_by_the_mf_formula():
    params, apply, rows, bias, fac = filled()
    q = fac / np.sqrt(np.mean(fac**2, axis=0))  # the tables are stored at unit RMS per dimension
    p = np.array([0.3, -0.2, 0.5])
    params = dict(params, user_factors=jnp.asarray(p, jnp.float32), user_bias=jnp.float32(0.1))
    items = np.array([1, 5, 9, 14])
    pred = apply(params, make_x(0, items, offset=3.9))
    # mu + b_u (+ the support mean's deviation from mu) + b_i + p . q_i
    want = 3.6 + 0.1 + (3.9 - 3.6) + bias[items - 1] + q[items - 1] @ p
    np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(apply)(params, make_x(0, items, 3.9)), pred, atol=1e-6)


def test_unknown_items_use_the_content_path():
    params, apply, *_ = filled()
    # an out-of-vocabulary id (0, or outside the table) is a new item: zero-initialised content
    # heads start it at mu + b_u + (offset - mu)
    new = np.array([0, 0, 0, 99, -4])
    np.testing.assert_allclose(apply(params, make_x(1, new, 3.2)), 3.2, atol=1e-6)
    # once the content head is trained, new items are told apart by their content
    params["content_bias"]["kernel"] = jnp.ones_like(params["content_bias"]["kernel"])
    pred = np.asarray(apply(params, make_x(1, new, 3.2)))
    assert len(np.unique(pred.round(5))) > 1


def test_id_dropout_only_with_train_and_key():
    params, apply, *_ = filled(id_dropout=0.5)
    params["content_bias"]["kernel"] = jnp.ones_like(params["content_bias"]["kernel"])
    x = make_x(2, np.arange(1, 15))
    base = apply(params, x)
    np.testing.assert_array_equal(apply(params, x, train=True), base)
    np.testing.assert_array_equal(apply(params, x, key=jax.random.PRNGKey(0)), base)
    dropped = apply(params, x, key=jax.random.PRNGKey(0), train=True)
    changed = np.asarray(dropped != base)
    assert 0 < changed.sum() < len(changed)


def test_adapt_filters_select_the_user_representation():
    params, *_ = filled(hidden=(5,))
    mask = hybrid.adapt_filter("user")(params)
    chosen = {k for k, v in mask.items() if v is True}
    assert chosen == {"user_factors", "user_bias"}
    head = hybrid.adapt_filter("user+head")(params)
    assert head["out"] == {"kernel": True, "bias": True} and head["mlp_0"]["kernel"] is False
    with pytest.raises(ValueError, match="unknown adapt filter"):
        hybrid.adapt_filter("decision")


def test_the_inner_loop_converges_to_mf_fold_in():
    """Adapting (user bias, user vector) by gradient steps on the support MSE reaches the least
    squares fold-in of the same item tables (metarec.baselines.mf.mf_fold_in with reg 0)."""
    params, apply, rows, bias, fac = filled(seed=3)
    rng = np.random.default_rng(4)
    s_items = rng.choice(np.arange(1, 15), 12, replace=False)
    s_rating = rng.integers(1, 6, 12).astype(np.float32)
    x = make_x(5, s_items, offset=3.0)
    support = Examples(x=x, y=jnp.asarray(s_rating), mask=jnp.ones(12))
    objective = inner.make_objective(apply, inner.mse)
    phi = inner.adapt(
        params, support, objective, steps=4000, lr=0.2, mask=hybrid.adapt_filter("user")
    )
    q_items = np.array([2, 7, 11, 13])
    got = apply(phi, make_x(5, q_items, offset=3.0))
    b_u, p_u = mf_fold_in(
        jnp.asarray(bias), jnp.asarray(fac), 3.6, s_items - 1, s_rating, np.ones(12), reg=0.0
    )
    want = 3.6 + b_u + bias[q_items - 1] + fac[q_items - 1] @ np.asarray(p_u)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_shrunk_mse_by_hand():
    p, y, m = jnp.array([1.0, 2.0, 5.0]), jnp.array([2.0, 2.0, 1.0]), jnp.array([1.0, 1.0, 0.0])
    assert float(inner.shrunk_mse(0.0)(p, y, m)) == pytest.approx(float(inner.mse(p, y, m)))
    assert float(inner.shrunk_mse(3.0)(p, y, m)) == pytest.approx(1.0 / (2 + 3))
    with pytest.raises(ValueError, match="prior >= 0"):
        inner.shrunk_mse(-1.0)


def test_bad_tables_are_refused():
    init, _ = hybrid.make_hybrid(SPEC, dim=DIM)
    params = init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        hybrid.with_item_tables(params, [1, 2], [0.0, 0.0], np.zeros((2, 4)), 3.0)
    with pytest.raises(ValueError, match="in-vocabulary"):
        hybrid.with_item_tables(params, [0, 2], [0.0, 0.0], np.zeros((2, 3)), 3.0)


@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_tables_get_no_meta_gradient(freeze):
    params, apply, *_ = filled(freeze_tables=freeze)
    params = dict(params, user_factors=jnp.ones(DIM))
    x = make_x(6, np.array([1, 2, 3]))
    g = jax.grad(lambda p: jnp.sum(apply(p, x) ** 2))(params)
    moved = float(
        jnp.abs(g["item_factors"]["embedding"]).sum() + jnp.abs(g["item_bias"]["embedding"]).sum()
    )
    assert (moved == 0.0) == freeze
    assert float(jnp.abs(g["user_factors"]).sum()) > 0  # the user side always learns


def test_melu_variant_adds_the_cf_term_to_a_melu_network():
    melu_cfg = {"embed_dim": 4, "hidden": (6,), "residual": True, "residual_bound": 4.0}
    params, apply, rows, bias, fac = filled(melu=melu_cfg)
    assert set(params["melu"]) >= {"mlp_0", "out", "user_emb_0", "item_emb_1"}
    mask = hybrid.adapt_filter("user+decision")(params)
    assert mask["melu"]["mlp_0"]["kernel"] and mask["melu"]["out"]["bias"]
    assert not mask["melu"]["user_emb_0"]["embedding"] and mask["user_factors"]
    x = make_x(7, np.array([1, 2, 3]))
    from metarec.models.melu import MeLU

    net = MeLU(SPEC.user_vocab, SPEC.item_vocab, SPEC.n_genres, **melu_cfg)
    p = np.array([0.2, 0.1, -0.3])
    params = dict(params, user_factors=jnp.asarray(p, jnp.float32))
    q = fac / np.sqrt(np.mean(fac**2, axis=0))
    want = net.apply({"params": params["melu"]}, x) + bias[:3] + q[:3] @ p
    np.testing.assert_allclose(apply(params, x), want, rtol=1e-5, atol=1e-5)


def test_one_newton_step_on_the_sum_loss_is_ridge_fold_in():
    """A damped Newton inner step (metarec.meta.inner.adapt(newton=λ)) on SSE/scale from a zero
    user vector is MF's closed-form fold-in with L2 strength λ·scale/2, in one step."""
    params, apply, rows, bias, fac = filled(seed=8)
    q = fac / np.sqrt(np.mean(fac**2, axis=0))  # the model's (unit-RMS) item factors
    rng = np.random.default_rng(9)
    s_items = rng.choice(np.arange(1, 15), 7, replace=False)
    s_rating = rng.integers(1, 6, 7).astype(np.float32)
    x = make_x(10, s_items, offset=3.6)  # offset = mu: the user bias starts at 0
    support = Examples(x=x, y=jnp.asarray(s_rating), mask=jnp.ones(7))
    objective = inner.make_objective(apply, inner.scaled_sse(10.0))
    lam = 0.8
    phi = inner.adapt(
        params, support, objective, steps=1, lr=1.0, mask=hybrid.adapt_filter("user"), newton=lam
    )
    b_u, p_u = mf_fold_in(
        jnp.asarray(bias), jnp.asarray(q), 3.6, s_items - 1, s_rating, np.ones(7), reg=lam * 5.0
    )
    np.testing.assert_allclose(phi["user_bias"], b_u, atol=1e-4)
    np.testing.assert_allclose(phi["user_factors"], p_u, atol=1e-4)
    with pytest.raises(ValueError, match="at most 512 adapted parameters, the mask selects 600"):
        inner.adapt(
            {"w": jnp.zeros(600)},
            None,
            lambda p, s: jnp.sum(p["w"] ** 2),
            steps=1,
            lr=1.0,
            newton=1.0,
        )


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_neighbour_predictions_are_blended_by_learned_weights():
    params, apply, *_ = filled(n_nbr=2, nbr_init=0.3)
    base, apply0, *_ = filled()
    np.testing.assert_allclose(params["nbr_weight"], [0.3, 0.3])
    items = np.array([1, 5, 9, 25])
    x = make_x(2, items, 3.7)
    nbr = jnp.asarray(3.5 + np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
    w = jnp.array([0.5, 0.2])
    params = dict(params, nbr_weight=w)
    cf = apply0(base, x)  # the same model without neighbours
    known = np.array([1.0, 1.0, 1.0, 0.0])  # item 25 is out of vocabulary: not blended
    want = cf + known * ((nbr @ w) - 0.7 * cf)
    np.testing.assert_allclose(apply(params, x | {"nbr": nbr}), want, atol=1e-5)
    np.testing.assert_allclose(apply(params, x | {"nbr": nbr})[3], cf[3], atol=1e-6)
    _, apply_all, *_ = filled(n_nbr=2, nbr_new_items=True)  # every item blended
    np.testing.assert_allclose(
        apply_all(params, x | {"nbr": nbr}), cf + nbr @ w - 0.7 * cf, atol=1e-5
    )
    # the blend weights get a meta-gradient: d out / d w_f = nbr_f - cf (known items only)
    g = jax.grad(lambda p: jnp.sum(apply(p, x | {"nbr": nbr})))(params)["nbr_weight"]
    np.testing.assert_allclose(g, (known[:, None] * (nbr - cf[:, None])).sum(0), rtol=1e-4)
    # weights 0: exactly the model without neighbours
    zero = dict(params, nbr_weight=jnp.zeros(2))
    np.testing.assert_allclose(apply(zero, x | {"nbr": nbr}), cf, atol=1e-6)


def test_user_prior_reads_only_the_first_fields():
    init, apply = hybrid.make_hybrid(SPEC, dim=DIM, embed_dim=4, user_fields=2)
    names = [k for k in init(jax.random.PRNGKey(0)) if k.startswith("user_prior_")]
    assert sorted(names) == ["user_prior_0", "user_prior_1"]


def test_ids_dropped_in_meta_training_are_not_blended_either():
    """id dropout simulates new items: a dropped id takes the content path and no blend."""
    params, apply, *_ = filled(n_nbr=2, id_dropout=0.5)
    base, apply0, *_ = filled(id_dropout=0.5)
    items = np.tile(np.arange(1, 15), 4)
    x = make_x(3, items, 3.7)
    nbr = jnp.asarray(3.5 + np.random.default_rng(1).normal(size=(len(items), 2)), jnp.float32)
    params = dict(params, nbr_weight=jnp.array([0.5, 0.2]))
    key = jax.random.PRNGKey(7)
    cf = apply0(base, x, key=key, train=True)  # the same dropout draw without neighbours
    got = apply(params, x | {"nbr": nbr}, key=key, train=True)
    dropped = np.asarray(cf) == np.asarray(apply0(base, x | {"item": x["item"].at[:, 1].set(0)}))
    assert 0 < dropped.sum() < len(items)  # some ids dropped, some kept
    np.testing.assert_allclose(np.asarray(got)[dropped], np.asarray(cf)[dropped], atol=1e-6)
    kept = ~dropped
    want = np.asarray(cf + (nbr @ params["nbr_weight"]) - 0.7 * cf)
    np.testing.assert_allclose(np.asarray(got)[kept], want[kept], atol=1e-5)


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_new_items_blend_by_their_own_weights_over_the_as_new_features():
    """nbr_new_own: an out-of-vocabulary id (new, or dropped in meta-training) is blended by
    nbr_weight_new over x["nbr_new"]; a known id as before, by nbr_weight over x["nbr"]."""
    params, apply, *_ = filled(n_nbr=2, nbr_new_own=True, id_dropout=0.5)
    plain, apply_plain, *_ = filled(n_nbr=2, id_dropout=0.5)
    base, apply0, *_ = filled(id_dropout=0.5)
    np.testing.assert_allclose(params["nbr_weight_new"], params["nbr_weight"])
    rng = np.random.default_rng(2)
    # ids 1-14 have table rows (so a dropped one predicts differently), 20-25 are out of vocabulary
    items = np.tile(np.r_[1:15, 20:26], 3)
    x = make_x(4, items, 3.7)
    nbr = jnp.asarray(3.5 + rng.normal(size=(len(items), 2)), jnp.float32)
    nbr_new = jnp.asarray(3.5 + rng.normal(size=(len(items), 2)), jnp.float32)
    w, w_new = jnp.array([0.5, 0.2]), jnp.array([0.1, 0.6])
    params = dict(params, nbr_weight=w, nbr_weight_new=w_new)
    xs = x | {"nbr": nbr, "nbr_new": nbr_new}
    known = np.asarray(items < 20)
    cf = np.asarray(apply0(base, x))
    got = np.asarray(apply(params, xs))
    want_known = cf + np.asarray(nbr @ w) - 0.7 * cf
    want_new = cf + np.asarray(nbr_new @ w_new) - 0.7 * cf
    np.testing.assert_allclose(got[known], want_known[known], atol=1e-5)
    np.testing.assert_allclose(got[~known], want_new[~known], atol=1e-5)
    # known items: the same prediction as the model without the option
    plain = dict(plain, nbr_weight=w)
    np.testing.assert_allclose(got[known], np.asarray(apply_plain(plain, xs))[known], atol=1e-6)
    # meta-training: a dropped id is met as a new item is (its as-new features, its weights)
    key = jax.random.PRNGKey(5)
    cf_t = np.asarray(apply0(base, x, key=key, train=True))
    got_t = np.asarray(apply(params, xs, key=key, train=True))
    dropped = cf_t == np.asarray(apply0(base, x | {"item": x["item"].at[:, 1].set(0)}))
    assert (dropped & known).sum() > 0 and (~dropped & known).sum() > 0
    np.testing.assert_allclose(got_t[dropped], (cf_t + nbr_new @ w_new - 0.7 * cf_t)[dropped],
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(got_t[~dropped], (cf_t + nbr @ w - 0.7 * cf_t)[~dropped], atol=1e-5)
    # each weight vector gets the meta-gradient of its own items only
    g = jax.grad(lambda p: jnp.sum(apply(p, xs)))(params)
    k = known[:, None]
    np.testing.assert_allclose(g["nbr_weight"], (k * (nbr - cf[:, None])).sum(0), rtol=1e-4)
    np.testing.assert_allclose(
        g["nbr_weight_new"], (~k * (nbr_new - cf[:, None])).sum(0), rtol=1e-4
    )


def test_learned_tables_start_random_so_user_and_item_vectors_both_learn():
    """With zero item factors and a zero user vector, p . q has zero gradient in both: tables
    learned in the outer loop (no MF fill) start N(0, table_init^2)."""
    init0, _ = hybrid.make_hybrid(SPEC, dim=DIM, embed_dim=4)
    assert float(jnp.abs(init0(jax.random.PRNGKey(0))["item_factors"]["embedding"]).sum()) == 0.0
    init, apply = hybrid.make_hybrid(SPEC, dim=DIM, embed_dim=4, table_init=0.1)
    params = init(jax.random.PRNGKey(0))
    table = np.asarray(params["item_factors"]["embedding"])
    assert 0.05 < table.std() < 0.2
    x = make_x(7, np.array([1, 2, 3]))
    g = jax.grad(lambda p: jnp.sum((apply(p, x) - 5.0) ** 2))(params)
    assert float(jnp.abs(g["user_factors"]).sum()) > 0
    p1 = dict(params, user_factors=params["user_factors"] - 0.1 * g["user_factors"])
    g1 = jax.grad(lambda p: jnp.sum((apply(p, x) - 5.0) ** 2))(p1)
    assert float(jnp.abs(g1["item_factors"]["embedding"]).sum()) > 0


def test_new_items_shrink_toward_the_support_mean_by_a_fixed_weight():
    params, apply, *_ = filled(seed=2)
    _, shrunk = hybrid.make_hybrid(SPEC, dim=DIM, embed_dim=4, new_item_mean=0.25)
    # a content path that predicts something other than the support mean
    params = dict(params, user_bias=jnp.float32(0.4))
    items = np.array([1, 9, 0, 17, 99, -3])  # ids in the vocabulary, and three outside it
    x = make_x(3, items, offset=2.8)
    plain, got = apply(params, x), shrunk(params, x)
    known = np.array([True, True, False, True, False, False])
    np.testing.assert_array_equal(got[known], plain[known])
    np.testing.assert_allclose(got[~known], 0.75 * plain[~known] + 0.25 * 2.8, rtol=1e-6)
    assert not np.allclose(got[~known], plain[~known])
    # ids dropped in meta-training are new items too
    drop = dict(x, item=x["item"].at[:, 1].set(0))
    np.testing.assert_allclose(
        shrunk(params, drop, key=None), 0.75 * apply(params, drop) + 0.25 * 2.8, rtol=1e-6
    )
    with pytest.raises(ValueError, match="new_item_mean"):
        hybrid.make_hybrid(SPEC, new_item_mean=1.5)
