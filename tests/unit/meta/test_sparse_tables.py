"""The meta-step with row-gathered embedding tables (``make_meta_step(..., sparse_tables=...)``,
:mod:`metarec.meta.tables`) against the default dense step on a small MeLU: same meta-gradient and
same parameters after a few steps (float tolerance), jit equals no-jit, and the cases it cannot
handle exactly are refused."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarec import meta
from metarec.data import make_synthetic_tasks
from metarec.meta import step as mstep
from metarec.meta.tables import LookupTable
from metarec.models import melu

T, S, Q = 8, 6, 4


def make_problem():
    tasks, spec, _ = make_synthetic_tasks(0, n_users=T, n_items=60, n_support=S, n_query=Q)
    init_fn, apply_fn = melu.make_melu(spec, embed_dim=4, hidden=(8,), feature_dropout=0.1)
    return tasks, spec, init_fn(jax.random.PRNGKey(0)), apply_fn


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def grad_capture() -> optax.GradientTransformation:
    """An "optimizer" whose state after ``update`` is the meta-gradient it was given."""

    def init(params):
        return jax.tree_util.tree_map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        return jax.tree_util.tree_map(jnp.zeros_like, updates), updates

    return optax.GradientTransformation(init, update)


def learner(name, apply_fn, mode="decision"):
    return meta.make_learner(
        name, apply_fn, inner_steps=2, inner_lr=0.05, adapt_mask=melu.adapt_filter(mode)
    )


def assert_close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(x))) + 1e-6
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    "name,dropout_key,chunk",
    [
        pytest.param("maml", True, None, marks=pytest.mark.slow),  # over 6 s, as the metasgd case
        ("maml", False, 4),
        ("fomaml", True, None),
        pytest.param("metasgd", True, 4, marks=pytest.mark.slow),
    ],
)
def test_meta_gradient_equals_dense(problem, name, dropout_key, chunk):
    tasks, spec, params, apply_fn = problem
    lrn = learner(name, apply_fn)
    mp = lrn.init(params)
    opt = grad_capture()
    w = jnp.asarray([1.0] * (T - 1) + [0.0])  # one padding task: contributes nothing either way
    key = jax.random.PRNGKey(3) if dropout_key else None
    dense = mstep.make_meta_step(lrn, opt, chunk_size=chunk)(mp, opt.init(mp), tasks, w, key)
    sparse_step = mstep.make_meta_step(
        lrn, opt, chunk_size=chunk, sparse_tables=melu.lookup_tables(spec)
    )
    sparse = sparse_step(mp, opt.init(mp), tasks, w, key)
    assert float(sparse[2]["loss"]) == pytest.approx(float(dense[2]["loss"]), rel=1e-6)
    assert_close(dense[1], sparse[1])  # the captured meta-gradient
    table = dense[1]["item_emb_1"]["embedding"] if name != "metasgd" else None
    if table is not None:  # the item-id table really receives a (sparse) gradient
        assert 0 < int(jnp.sum(jnp.any(table != 0, axis=1))) < table.shape[0]


@pytest.mark.parametrize("name", ["maml", pytest.param("metasgd", marks=pytest.mark.slow)])
def test_parameters_after_steps_equal_dense(problem, name):
    tasks, spec, params, apply_fn = problem
    lrn = learner(name, apply_fn)
    opt = optax.adam(1e-2)
    w = jnp.ones((T,))
    steps = {
        "dense": mstep.make_meta_step(lrn, opt, clip_norm=10.0),
        "sparse": mstep.make_meta_step(
            lrn, opt, clip_norm=10.0, sparse_tables=melu.lookup_tables(spec, min_vocab=6)
        ),
    }
    out = {}
    for label, step in steps.items():
        mp = lrn.init(params)
        st = opt.init(mp)
        for i in range(3):
            mp, st, _ = step(mp, st, tasks, w, jax.random.PRNGKey(i))
        out[label] = mp
    assert_close(out["dense"], out["sparse"])


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_jit_equals_no_jit(problem):
    tasks, spec, params, apply_fn = problem
    tasks = jax.tree_util.tree_map(lambda a: a[:2], tasks)  # eager execution is slow: 2 tasks
    lrn = meta.maml(
        apply_fn, inner_steps=1, inner_lr=0.05, adapt_mask=melu.adapt_filter("decision")
    )
    opt = optax.adam(1e-2)
    tabs = melu.lookup_tables(spec)
    w = jnp.ones((2,))
    a = mstep.make_meta_step(lrn, opt, sparse_tables=tabs)(params, opt.init(params), tasks, w)
    b = mstep.make_meta_step(lrn, opt, sparse_tables=tabs, jit=False)(
        params, opt.init(params), tasks, w
    )
    assert_close(a[0], b[0], rtol=1e-6)


@pytest.mark.parametrize(
    "name,mode", [("maml", "all"), ("maml", "embeddings"), ("reptile", "decision")]
)
def test_adapted_table_is_refused(problem, name, mode):
    """Reptile adapts every parameter whatever the mask (the registry's rule)."""
    tasks, spec, params, apply_fn = problem
    lrn = learner(name, apply_fn, mode)
    step = mstep.make_meta_step(lrn, optax.sgd(0.1), sparse_tables=melu.lookup_tables(spec))
    with pytest.raises(ValueError, match="adapted by the inner loop"):
        step(params, optax.sgd(0.1).init(params), tasks, jnp.ones((T,)))


def test_unsupported_model_and_bad_path_are_refused(problem):
    tasks, spec, params, apply_fn = problem

    class FixedTable(nn.Module):  # flax checks the table shape: cannot run on gathered rows
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.Embed(61, 4, name="emb")(x["item"][..., 1]))[..., 0]

    module = FixedTable()
    p = module.init(jax.random.PRNGKey(0), jax.tree_util.tree_map(lambda a: a[0], tasks.query.x))
    p = p["params"]
    lrn = meta.maml(
        lambda q, x: module.apply({"params": q}, x),
        inner_steps=1,
        inner_lr=0.1,
        adapt_mask=meta.path_filter("^Dense_0/"),
    )
    opt = optax.sgd(0.1)
    ok = (LookupTable("emb/embedding", "item", 1, 61),)
    with pytest.raises(ValueError, match="does not run on a row-gathered table"):
        mstep.make_meta_step(lrn, opt, sparse_tables=ok)(p, opt.init(p), tasks, jnp.ones((T,)))
    bad = (LookupTable("nope/embedding", "item", 1, 61),)
    with pytest.raises(ValueError, match="no meta-parameter at path 'nope/embedding'"):
        mstep.make_meta_step(lrn, opt, sparse_tables=bad)(p, opt.init(p), tasks, jnp.ones((T,)))


def test_no_dense_per_task_table_gradient():
    """At a 20k-row item table the sparse step's compiled temporaries are a fraction of the dense
    step's (which holds a [T, vocab, dim] gradient)."""
    tasks, spec, _ = make_synthetic_tasks(0, n_users=T, n_items=20_000, n_support=S, n_query=Q)
    init_fn, apply_fn = melu.make_melu(spec, embed_dim=8, hidden=(8,))
    params = init_fn(jax.random.PRNGKey(0))
    lrn = meta.maml(
        apply_fn, inner_steps=1, inner_lr=0.05, adapt_mask=melu.adapt_filter("decision")
    )
    opt = optax.sgd(0.1)
    w = jnp.ones((T,))

    def temp_bytes(**kw):
        step = mstep.make_meta_step(lrn, opt, **kw)
        compiled = step.lower(params, opt.init(params), tasks, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense = temp_bytes()
    sparse = temp_bytes(sparse_tables=melu.lookup_tables(spec, min_vocab=100))
    assert dense >= T * 20_000 * 8 * 4  # the per-task table gradients
    assert sparse < dense / 4


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp
from metarec.meta import step as mstep
from metarec.models import melu
from tests.unit.meta import test_sparse_tables as t

assert jax.device_count() == 2, jax.devices()
tasks, spec, params, apply_fn = t.make_problem()
lrn, opt, mesh = t.learner("maml", apply_fn), t.grad_capture(), mstep.make_mesh(2)
mp, w, key = lrn.init(params), jnp.asarray([1.0] * (t.T - 1) + [0.0]), jax.random.PRNGKey(3)
dense = mstep.make_meta_step(lrn, opt, chunk_size=4)(mp, opt.init(mp), tasks, w, key)
sharded = mstep.make_meta_step(lrn, opt, chunk_size=4, mesh=mesh,
                               sparse_tables=melu.lookup_tables(spec))
out = sharded(mstep.replicate(mp, mesh), mstep.replicate(opt.init(mp), mesh),
              mstep.shard_tasks(tasks, mesh), mstep.shard_tasks(w, mesh), key)
t.assert_close(dense[1], out[1])
assert all(g.sharding.is_fully_replicated for g in jax.tree_util.tree_leaves(out[1]))
print("SHARDED_SPARSE_OK")
"""


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_sharded_step_with_gathered_tables_equals_dense_single_device():
    from tests.conftest import run_on_host_devices

    res = run_on_host_devices(_SHARDED_SCRIPT, 2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SHARDED_SPARSE_OK" in res.stdout
