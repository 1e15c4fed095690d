"""The learners' ``staged`` option with MeLU's split (:func:`metarec.models.melu.make_stages`):
the same predictions and meta-gradients as the plain model, the embedding work out of the inner
loop, and the plain path wherever the inner loop adapts what the features read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarec import meta
from metarec.data import make_synthetic_tasks
from metarec.data.tasks import index_tasks
from metarec.meta import step as mstep
from metarec.models import melu

T, S, Q = 6, 7, 5


@pytest.fixture(scope="module")
def data():
    tasks, spec, _ = make_synthetic_tasks(1, n_users=T, n_items=50, n_support=S, n_query=Q)
    return tasks, spec


def assert_close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(x))) + 1e-6
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * scale)


def both(spec, **kw):
    init_fn, apply_fn = melu.make_melu(spec, **kw)
    return init_fn(jax.random.PRNGKey(0)), apply_fn, melu.make_stages(spec, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(embed_dim=4, hidden=(8, 6), feature_dropout=0.3),
        dict(embed_dim=3, hidden=(5,), feature_dropout=(0.5, 0.0, 0.2, 0.4, 0.3, 0.6)),
        dict(embed_dim=4, hidden=(), use_item_id=False, residual=False, feature_dropout=0.3),
        pytest.param(dict(embed_dim=4, hidden=(8,), residual_bound=0.5), marks=pytest.mark.slow),
    ],
)
def test_head_of_features_equals_apply(data, kw):
    tasks, spec = data
    params, apply_fn, st = both(spec, **kw)
    x = index_tasks(tasks, 2).support.x
    x = dict(x, item=jnp.asarray(x["item"]).at[0, 1].set(10_000).at[1, 1].set(-3))  # invalid: OOV

    @jax.jit
    def pair(key):
        want = apply_fn(params, x, key=key, train=True)
        return want, st.head(params, st.features(params, x), key=key, train=True)

    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    (a, a_staged), (b, b_staged) = pair(keys[0]), pair(keys[1])
    np.testing.assert_allclose(np.asarray(a_staged), np.asarray(a), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(b_staged), np.asarray(b), rtol=1e-6, atol=1e-6)
    if any(np.atleast_1d(kw.get("feature_dropout", 0.0))):  # the draws differ: not vacuous
        assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    z = jax.jit(st.features)(params, x)  # no key: no dropout
    np.testing.assert_allclose(
        np.asarray(jax.jit(st.head)(params, z)), np.asarray(jax.jit(apply_fn)(params, x)), 1e-6
    )


@pytest.mark.parametrize(
    "name,use_key",
    [
        ("maml", True),
        pytest.param("fomaml", False, marks=pytest.mark.slow),
        ("metasgd", False),
        pytest.param("metasgd", True, marks=pytest.mark.slow),
    ],
)
def test_task_grad_and_adapt_equal_plain(data, name, use_key):
    tasks, spec = data
    params, apply_fn, st = both(spec, embed_dim=4, hidden=(8, 6), feature_dropout=0.2)
    kw = dict(inner_steps=3, inner_lr=0.1, adapt_mask=melu.adapt_filter("decision"))
    plain = meta.make_learner(name, apply_fn, **kw)
    staged = meta.make_learner(name, apply_fn, staged=st, **kw)
    mp = plain.init(params)
    task = index_tasks(tasks, 3)
    key = jax.random.PRNGKey(7) if use_key else None
    lp, gp = jax.jit(plain.task_grad)(mp, task, key)
    ls, gs = jax.jit(staged.task_grad)(mp, task, key)
    np.testing.assert_allclose(float(ls), float(lp), rtol=1e-6)
    assert_close(gp, gs)
    # every embedding table receives its meta-gradient through the hoisted features
    table = (gs.params if name == "metasgd" else gs)["item_emb_1"]["embedding"]
    assert float(jnp.max(jnp.abs(table))) > 0
    assert_close(jax.jit(plain.adapt)(mp, task.support), jax.jit(staged.adapt)(mp, task.support))


def _primitives_in_loops(jaxpr, inside=False, out=None):
    """Names of the primitives that run inside a ``scan`` body, anywhere in ``jaxpr``."""
    out = set() if out is None else out
    for eqn in jaxpr.eqns:
        if inside:
            out.add(eqn.primitive.name)
        for v in eqn.params.values():
            for j in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(j, "jaxpr", j)  # a ClosedJaxpr's jaxpr, or a Jaxpr itself
                if hasattr(sub, "eqns"):
                    _primitives_in_loops(sub, inside or eqn.primitive.name == "scan", out)
    return out


def test_no_table_gather_inside_the_inner_loop(data):
    tasks, spec = data
    params, apply_fn, st = both(spec, embed_dim=4, hidden=(8,), feature_dropout=0.2)
    kw = dict(inner_steps=2, inner_lr=0.1, adapt_mask=melu.adapt_filter("decision"))
    task, key = index_tasks(tasks, 0), jax.random.PRNGKey(1)
    prims = {}
    for label, extra in (("plain", {}), ("staged", {"staged": st})):
        lrn = meta.make_learner("maml", apply_fn, **kw, **extra)
        jaxpr = jax.make_jaxpr(lrn.task_grad)(lrn.init(params), task, key).jaxpr
        prims[label] = _primitives_in_loops(jaxpr)
    assert "gather" in prims["plain"]  # the check can fail: the plain loop does look tables up
    assert not {"gather", "scatter-add", "scatter_add"} & prims["staged"]


def test_falls_back_where_the_features_are_adapted(data):
    tasks, spec = data
    params, apply_fn, st = both(spec, embed_dim=4, hidden=(8,), feature_dropout=0.2)
    kw = dict(inner_steps=2, inner_lr=0.1, adapt_mask=melu.adapt_filter("all"))
    plain = meta.make_learner("maml", apply_fn, **kw)
    staged = meta.make_learner("maml", apply_fn, staged=st, **kw)
    task, key = index_tasks(tasks, 1), jax.random.PRNGKey(2)
    lp, gp = jax.jit(plain.task_grad)(params, task, key)
    ls, gs = jax.jit(staged.task_grad)(params, task, key)
    assert float(ls) == float(lp)
    for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(gs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the plain path, bit for bit


@pytest.mark.parametrize("sparse", [pytest.param(False, marks=pytest.mark.slow), True])
def test_meta_step_equals_plain(data, sparse):
    """The whole meta-step (vmap over tasks, chunks, optimizer), also with row-gathered tables
    (against the plain step with dense tables)."""
    tasks, spec = data
    params, apply_fn, st = both(spec, embed_dim=4, hidden=(8,), feature_dropout=0.1)
    kw = dict(inner_steps=2, inner_lr=0.05, adapt_mask=melu.adapt_filter("decision"))
    opt = optax.adam(1e-2)
    w = jnp.ones((T,))
    tables = melu.lookup_tables(spec) if sparse else None
    out = []
    for extra, sparse_tables in (({}, None), ({"staged": st}, tables)):
        lrn = meta.make_learner("maml", apply_fn, **kw, **extra)
        step = mstep.make_meta_step(lrn, opt, chunk_size=3, sparse_tables=sparse_tables)
        mp, state = lrn.init(params), opt.init(params)
        for i in range(2):
            mp, state, _ = step(mp, state, tasks, w, jax.random.PRNGKey(i))
        out.append(mp)
    assert_close(out[0], out[1])


def test_context_model_is_refused(data):
    _, spec = data
    with pytest.raises(ValueError, match="context_dim"):
        melu.make_stages(spec, embed_dim=4, context_dim=2)


def test_learners_without_the_option_refuse_it(data):
    _, spec = data
    _, apply_fn, st = both(spec, embed_dim=4, hidden=(8,))
    with pytest.raises(ValueError, match="staged"):
        meta.make_learner("reptile", apply_fn, staged=st)
