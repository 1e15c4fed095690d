"""Tests of the inner loop, the meta-learners and the meta step (metarec.meta, metarec.meta.step).

The gradient tests run in float64 (``jax.enable_x64``) and compare with closed forms on quadratic
(linear-regression) tasks or with central finite differences, so any missing second-order term,
wrong sign or wrong mask shows up.
"""

from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metarec import meta
from metarec.data.tasks import Examples, Task, pad_tasks
from metarec.meta import step as train
from metarec.training.meta_train import meta_fit
from tests.conftest import run_on_host_devices

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def linear_apply(params, x):
    """Linear regression ``x @ w (+ b)``; params is an array ``w`` or a dict ``{"w", "b"}``."""
    if isinstance(params, dict):
        return x @ params["w"] + params["b"]
    return x @ params


def mlp_init(key, d_in=3, hidden=4, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "l1": {
            "w": jax.random.normal(k1, (d_in, hidden), dtype) * 0.7,
            "b": jax.random.normal(k2, (hidden,), dtype) * 0.1,
        },
        "l2": {
            "w": jax.random.normal(k3, (hidden,), dtype) * 0.7,
            "b": jax.random.normal(k4, (), dtype) * 0.1,
        },
    }


def mlp_apply(params, x):
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    return h @ params["l2"]["w"] + params["l2"]["b"]


def make_examples(rng: np.random.Generator, n, d, n_real=None, dtype=np.float32, w=None):
    x = rng.normal(size=(n, d)).astype(dtype)
    w = rng.normal(size=(d,)) if w is None else w
    y = (x @ w + 0.1 * rng.normal(size=n)).astype(dtype)
    mask = np.zeros(n, dtype)
    mask[: (n if n_real is None else n_real)] = 1
    return Examples(x=jnp.asarray(x), y=jnp.asarray(y), mask=jnp.asarray(mask))


def make_tasks(seed, T, d=3, ns=6, nq=5, dtype=np.float32):
    """T regression tasks with task-specific weights and varying counts of real support examples."""
    rng = np.random.default_rng(seed)
    sup, qry = [], []
    for t in range(T):
        w = rng.normal(size=d) + 1.0
        sup.append(make_examples(rng, ns, d, n_real=ns - t % 3, dtype=dtype, w=w))
        qry.append(make_examples(rng, nq, d, dtype=dtype, w=w))

    def stack(xs):
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)

    return Task(support=stack(sup), query=stack(qry), user=jnp.arange(T))


def index(tasks, i):
    return jax.tree_util.tree_map(lambda a: a[i], tasks)


MLP_MASK = {"l1": {"w": False, "b": False}, "l2": {"w": True, "b": True}}


def all_learners(apply_fn=mlp_apply, steps=3, mask=None):
    return {
        "maml": meta.maml(apply_fn, inner_steps=steps, inner_lr=0.1, adapt_mask=mask),
        "fomaml": meta.fomaml(apply_fn, inner_steps=steps, inner_lr=0.1, adapt_mask=mask),
        "reptile": meta.reptile(apply_fn, inner_steps=steps, inner_lr=0.1, adapt_mask=mask),
        "metasgd": meta.metasgd(apply_fn, inner_steps=steps, inner_lr=0.1, adapt_mask=mask),
        "imaml": meta.imaml(
            apply_fn, inner_steps=steps, inner_lr=0.1, adapt_mask=mask, lam=2.0, cg_steps=4
        ),
    }


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# losses and the inner loop
# ----------------------------------------------------------------------------------------------


def test_masked_mse_hand_computed_and_empty_is_zero():
    preds = jnp.array([1.0, 2.0, 3.0, 100.0])
    y = jnp.array([0.0, 4.0, 3.0, 0.0])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    assert float(meta.mse(preds, y, mask)) == pytest.approx((1 + 4 + 0) / 3)
    assert float(meta.mae(preds, y, mask)) == pytest.approx((1 + 2 + 0) / 3)
    zero = jnp.zeros(4)
    assert float(meta.mse(preds, y, zero)) == 0.0
    g = jax.grad(lambda p: meta.mse(p, y, zero))(preds)
    assert np.all(np.asarray(g) == 0.0)


def test_adapt_matches_manual_gradient_descent_and_respects_mask():
    params = mlp_init(jax.random.key(0))
    ex = make_examples(np.random.default_rng(0), 8, 3, n_real=6)
    obj = meta.make_objective(mlp_apply)
    lr = 0.05
    out = meta.adapt(params, ex, obj, steps=4, lr=lr, mask=MLP_MASK)
    manual = params
    for _ in range(4):
        g = jax.grad(obj)(manual, ex)
        manual = {
            "l1": manual["l1"],
            "l2": jax.tree_util.tree_map(lambda p, gi: p - lr * gi, manual["l2"], g["l2"]),
        }
    assert_tree_close(out, manual)
    assert_tree_close(out["l1"], params["l1"], rtol=0, atol=0)  # frozen leaves untouched
    # steps = 0 is the identity; per-parameter lr pytree with a zero rate freezes that leaf
    assert_tree_close(meta.adapt(params, ex, obj, steps=0, lr=lr), params, rtol=0, atol=0)
    lrs = jax.tree_util.tree_map(lambda p: jnp.full_like(p, lr), params)
    lrs["l2"]["b"] = jnp.zeros_like(lrs["l2"]["b"])
    out2 = meta.adapt(params, ex, obj, steps=2, lr=lrs)
    assert float(out2["l2"]["b"]) == float(params["l2"]["b"])
    assert not np.allclose(out2["l1"]["w"], params["l1"]["w"])


def test_adapt_rejects_bad_masks():
    params = mlp_init(jax.random.key(0))
    ex = make_examples(np.random.default_rng(0), 4, 3)
    obj = meta.make_objective(mlp_apply)
    with pytest.raises(ValueError, match="does not match the parameter structure"):
        meta.adapt(params, ex, obj, steps=1, lr=0.1, mask={"l1": True})
    with pytest.raises(ValueError, match="selects no parameter"):
        meta.adapt(
            params, ex, obj, steps=1, lr=0.1, mask=jax.tree_util.tree_map(lambda _: False, params)
        )
    with pytest.raises(ValueError, match="steps"):
        meta.adapt(params, ex, obj, steps=-1, lr=0.1)


# ----------------------------------------------------------------------------------------------
# closed forms on quadratic tasks (float64)
# ----------------------------------------------------------------------------------------------


def _quadratic_problem(d=3, ns=7, nq=6, seed=0):
    """Linear regression sets: masked MSE of x @ θ is L(θ) = ½(θ-a)ᵀA(θ-a) + c with A = 2XᵀX/N."""
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(ns, d)) * 0.6
    xq = rng.normal(size=(nq, d)) * 0.6
    a, b = rng.normal(size=d), rng.normal(size=d)
    sup = Examples(x=jnp.asarray(xs), y=jnp.asarray(xs @ a), mask=jnp.ones(ns))
    qry = Examples(x=jnp.asarray(xq), y=jnp.asarray(xq @ b), mask=jnp.ones(nq))
    A, B = 2 * xs.T @ xs / ns, 2 * xq.T @ xq / nq
    theta = rng.normal(size=d)
    return Task(support=sup, query=qry, user=jnp.asarray(0)), A, B, a, b, theta


def test_maml_and_fomaml_match_closed_form_on_quadratic():
    with jax.enable_x64(True):
        task, A, B, a, b, theta = _quadratic_problem()
        alpha, K = 0.3, 4
        phi = theta.copy()
        for _ in range(K):
            phi = phi - alpha * A @ (phi - a)
        gq = B @ (phi - b)
        expected_maml = np.linalg.matrix_power(np.eye(3) - alpha * A, K) @ gq
        lm = meta.maml(linear_apply, inner_steps=K, inner_lr=alpha)
        lf = meta.fomaml(linear_apply, inner_steps=K, inner_lr=alpha)
        loss, g = lm.task_grad(jnp.asarray(theta), task)
        assert g.dtype == jnp.float64
        np.testing.assert_allclose(
            np.asarray(lm.adapt(jnp.asarray(theta), task.support)), phi, rtol=1e-12
        )
        np.testing.assert_allclose(np.asarray(g), expected_maml, rtol=1e-10, atol=1e-12)
        assert float(loss) == pytest.approx(0.5 * (phi - b) @ B @ (phi - b), rel=1e-10)
        _, gf = lf.task_grad(jnp.asarray(theta), task)
        np.testing.assert_allclose(np.asarray(gf), gq, rtol=1e-10, atol=1e-12)
        # the second-order term is really there: MAML and FOMAML differ
        assert np.linalg.norm(expected_maml - gq) > 1e-2 * np.linalg.norm(gq)
        # remat gives the same second-order gradient
        _, gr = meta.maml(linear_apply, inner_steps=K, inner_lr=alpha, remat=True).task_grad(
            jnp.asarray(theta), task
        )
        np.testing.assert_allclose(np.asarray(gr), expected_maml, rtol=1e-10, atol=1e-12)


def test_imaml_matches_closed_form_on_quadratic():
    with jax.enable_x64(True):
        task, A, B, a, b, theta = _quadratic_problem()
        lam = 1.5
        phi_star = np.linalg.solve(A + lam * np.eye(3), A @ a + lam * theta)
        expected = np.linalg.solve(np.eye(3) + A / lam, B @ (phi_star - b))
        learner = meta.imaml(linear_apply, inner_steps=300, inner_lr=0.3, lam=lam, cg_steps=3)
        phi = learner.adapt(jnp.asarray(theta), task.support)
        np.testing.assert_allclose(np.asarray(phi), phi_star, rtol=1e-9, atol=1e-10)
        loss, g = learner.task_grad(jnp.asarray(theta), task)
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-8, atol=1e-10)
        # fewer CG steps than dimensions is an approximation, not the exact solve
        _, g1 = meta.imaml(
            linear_apply, inner_steps=300, inner_lr=0.3, lam=lam, cg_steps=1
        ).task_grad(jnp.asarray(theta), task)
        assert not np.allclose(np.asarray(g1), expected, rtol=1e-4)


def test_cg_solve_exact_for_spd_and_safe_at_zero():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 4)).astype(np.float32)
    A = jnp.asarray(m @ m.T + 4 * np.eye(4, dtype=np.float32))
    b = [jnp.asarray(rng.normal(size=4).astype(np.float32))]
    (x,) = meta.cg_solve(lambda v: [A @ v[0]], b, steps=4)
    np.testing.assert_allclose(np.asarray(A @ x), np.asarray(b[0]), rtol=1e-3, atol=1e-4)
    (z,) = meta.cg_solve(lambda v: [A @ v[0]], [jnp.zeros(4)], steps=3)
    assert np.all(np.asarray(z) == 0.0)


def test_cg_solve_stops_on_indefinite_system_and_stays_bounded():
    """Away from a minimum ``I + H/lam`` is indefinite (seen on MovieLens once the inner loop had
    diverged). Truncated CG stops at the first non-positive-curvature direction: finite, never
    up-hill on the quadratic model, ``x = b`` if the very first direction has ``pᵀAp <= 0`` (the old
    iteration returned 0 there, i.e. dropped the task's gradient)."""
    # a direction with pᵀAp = 0 exactly at the first step: fall back to x = b
    A = jnp.diag(jnp.asarray([1.0, -1.0]))
    (x,) = meta.cg_solve(lambda v: [A @ v[0]], [jnp.asarray([1.0, 1.0])], steps=5)
    np.testing.assert_allclose(np.asarray(x), [1.0, 1.0])
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    A = jnp.asarray(q @ np.diag([3.0, 2.0, 1.0, 0.5, -0.5, -2.0]) @ q.T, jnp.float32)
    for seed in range(20):
        b = [jnp.asarray(np.random.default_rng(seed).normal(size=6), jnp.float32)]
        (x,) = meta.cg_solve(lambda v: [A @ v[0]], b, steps=6)
        assert np.all(np.isfinite(np.asarray(x)))
        # x never goes up-hill on the quadratic model ½xᵀAx − bᵀx (except the x = b fallback)
        if not np.allclose(np.asarray(x), np.asarray(b[0])):
            assert float(0.5 * x @ A @ x - b[0] @ x) <= 1e-6
    # residual-based early exit: an exact solve stops and stays put (no 0/0 afterwards)
    A = jnp.diag(jnp.asarray([2.0, 2.0, 2.0]))
    (x,) = meta.cg_solve(lambda v: [A @ v[0]], [jnp.ones(3)], steps=4, tol=1e-6)
    np.testing.assert_allclose(np.asarray(x), 0.5 * np.ones(3))


def test_safeguarded_inner_loop_does_not_diverge_when_lr_exceeds_curvature_limit():
    """Regression: fixed-step GD diverges once lr > 2/λ_max of the (proximal) support loss — this is
    what killed iMAML's meta-training (λ_max at θ grew to ~500 with lr 0.05). The backtracking
    inner loop keeps the loss non-increasing; iMAML's task gradient stays finite; on a
    well-conditioned problem the safeguard changes nothing."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 3)) * np.asarray([10.0, 1.0, 0.1])).astype(np.float32)  # λ_max ~ 200
    sup = Examples(
        x=jnp.asarray(x), y=jnp.asarray(rng.normal(size=8).astype(np.float32)), mask=jnp.ones(8)
    )
    task = Task(support=sup, query=sup, user=jnp.asarray(0))
    obj = meta.make_objective(linear_apply)
    w0 = jnp.zeros(3)
    _, plain = meta.adapt(w0, sup, obj, steps=10, lr=0.05, return_losses=True)
    assert float(plain[-1]) > 1e6 * float(plain[0])  # the unsafeguarded loop explodes
    phi, safe = meta.adapt(w0, sup, obj, steps=10, lr=0.05, backtrack=10, return_losses=True)
    assert np.all(np.diff(np.asarray(safe)) <= 1e-6 * np.asarray(safe[:-1]))
    assert float(obj(phi, sup)) < float(safe[0])
    loss, g = meta.imaml(
        linear_apply, inner_steps=10, inner_lr=0.05, lam=1.0, cg_steps=5
    ).task_grad(w0, task)
    assert (
        np.isfinite(float(loss))
        and float(loss) < float(safe[0])
        and np.all(np.isfinite(np.asarray(g)))
    )
    # well-conditioned: identical to plain gradient descent
    small = Examples(x=sup.x / 100.0, y=sup.y, mask=sup.mask)
    a = meta.adapt(w0, small, obj, steps=10, lr=0.05)
    b = meta.adapt(w0, small, obj, steps=10, lr=0.05, backtrack=10)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# finite differences (float64)
# ----------------------------------------------------------------------------------------------


def _central_fd(f, x, eps=1e-5):
    flat, unravel = ravel_pytree(x)
    out = np.zeros(flat.shape[0])
    for i in range(flat.shape[0]):
        e = np.zeros(flat.shape[0])
        e[i] = eps
        out[i] = (f(unravel(flat + e)) - f(unravel(flat - e))) / (2 * eps)
    return out


@pytest.mark.parametrize("mask", [None, MLP_MASK], ids=["all", "head"])
def test_maml_meta_gradient_matches_finite_differences(mask):
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(1), dtype=jnp.float64)
        task = index(make_tasks(0, 1, dtype=np.float64), 0)
        learner = meta.maml(mlp_apply, inner_steps=3, inner_lr=0.2, adapt_mask=mask)
        task_grad = jax.jit(learner.task_grad)  # one compilation, reused for the FD evaluations
        _, g = task_grad(params, task)
        fd = _central_fd(lambda p: float(task_grad(p, task)[0]), params)
        np.testing.assert_allclose(np.asarray(ravel_pytree(g)[0]), fd, rtol=1e-6, atol=1e-8)
        # first-order MAML is measurably different on a non-quadratic model
        _, gf = jax.jit(
            meta.fomaml(mlp_apply, inner_steps=3, inner_lr=0.2, adapt_mask=mask).task_grad
        )(params, task)
        assert not np.allclose(np.asarray(ravel_pytree(gf)[0]), fd, rtol=1e-3)


def test_imaml_frozen_leaf_gradient_matches_finite_differences():
    """iMAML with a frozen bias: the implicit gradient (including the mixed term for the frozen
    leaf) equals the finite-difference derivative of θ -> L_q(φ*(θ)) at a converged inner solve."""
    with jax.enable_x64(True):
        task, *_ = _quadratic_problem(seed=3)
        params = {"w": jnp.asarray([0.3, -0.2, 0.5]), "b": jnp.asarray(0.4)}
        mask = {"w": True, "b": False}
        learner = meta.imaml(
            linear_apply, inner_steps=400, inner_lr=0.3, adapt_mask=mask, lam=0.8, cg_steps=3
        )
        _, g = jax.jit(learner.task_grad)(params, task)

        @jax.jit
        def outer(p):
            phi = learner.adapt(p, task.support)
            return meta.mse(linear_apply(phi, task.query.x), task.query.y, task.query.mask)

        fd = _central_fd(lambda p: float(outer(p)), params)
        np.testing.assert_allclose(np.asarray(ravel_pytree(g)[0]), fd, rtol=1e-6, atol=1e-8)
        assert abs(float(g["b"])) > 1e-3


# ----------------------------------------------------------------------------------------------
# Reptile and Meta-SGD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner_data", ["support", "support+query"])
def test_reptile_gradient_and_update_match_formula(inner_data):
    params = mlp_init(jax.random.key(2))
    tasks = make_tasks(1, 2)
    learner = meta.reptile(mlp_apply, inner_steps=3, inner_lr=0.1, inner_data=inner_data)
    obj = meta.make_objective(mlp_apply)
    phis = []
    task_grad = jax.jit(learner.task_grad)
    for t in range(2):
        task = index(tasks, t)
        data = task.support
        if inner_data == "support+query":
            data = jax.tree_util.tree_map(
                lambda u, v: jnp.concatenate([u, v]), task.support, task.query
            )
        phi = params
        for _ in range(3):
            phi = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, phi, jax.grad(obj)(phi, data))
        _, g = task_grad(params, task)
        assert_tree_close(
            g, jax.tree_util.tree_map(jnp.subtract, params, phi), rtol=1e-5, atol=1e-6
        )
        phis.append(phi)
    # one meta step with SGD(eps): θ <- θ + eps * mean_t(φ_t - θ)
    eps = 0.5
    step = train.make_meta_step(learner, optax.sgd(eps))
    new, _, metrics = step(params, optax.sgd(eps).init(params), tasks, jnp.ones(2))
    expected = jax.tree_util.tree_map(
        lambda p, a, b: p + eps * ((a - p) + (b - p)) / 2, params, *phis
    )
    assert_tree_close(new, expected, rtol=1e-5, atol=1e-6)
    assert bool(metrics["finite"])


def test_metasgd_learning_rates_get_gradients_and_reduce_to_maml():
    params = mlp_init(jax.random.key(3))
    task = index(make_tasks(2, 1), 0)
    learner = meta.metasgd(mlp_apply, inner_steps=2, inner_lr=0.1, adapt_mask=MLP_MASK)
    mp = learner.init(params)
    assert isinstance(mp, meta.MetaSGDParams)
    loss, g = jax.jit(learner.task_grad)(mp, task)
    for leaf in jax.tree_util.tree_leaves(g.lr["l2"]):
        assert np.all(np.isfinite(leaf)) and np.abs(np.asarray(leaf)).sum() > 0
    # frozen leaves: rate unused -> zero gradient
    for leaf in jax.tree_util.tree_leaves(g.lr["l1"]):
        assert np.all(np.asarray(leaf) == 0.0)
    # with all rates equal to inner_lr the init-gradient is MAML's
    l2, g_maml = jax.jit(
        meta.maml(mlp_apply, inner_steps=2, inner_lr=0.1, adapt_mask=MLP_MASK).task_grad
    )(params, task)
    assert float(loss) == pytest.approx(float(l2), rel=1e-6)
    assert_tree_close(g.params, g_maml, rtol=1e-5, atol=1e-7)
    assert_tree_close(learner.model_params(mp), params, rtol=0, atol=0)


def test_metasgd_lr_gradient_matches_finite_difference():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(4), dtype=jnp.float64)
        task = index(make_tasks(3, 1, dtype=np.float64), 0)
        learner = meta.metasgd(mlp_apply, inner_steps=2, inner_lr=0.15)
        mp = learner.init(params)
        task_grad = jax.jit(learner.task_grad)
        _, g = task_grad(mp, task)
        fd = _central_fd(
            lambda lr: float(task_grad(meta.MetaSGDParams(params, lr), task)[0]), mp.lr
        )
        np.testing.assert_allclose(np.asarray(ravel_pytree(g.lr)[0]), fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# the meta step: vmap == loop, jit == no-jit, determinism, chunking, padding, NaN guard, sharding
# ----------------------------------------------------------------------------------------------


def _grad_via_sgd_step(step, mp, tasks, weights, key=None):
    """With optax.sgd(1) the step returns mp - mean_grad, so mean_grad = mp - new."""
    new, _, metrics = step(mp, optax.sgd(1.0).init(mp), tasks, weights, key)
    return jax.tree_util.tree_map(jnp.subtract, mp, new), metrics


# Learners, jitted steps and jitted task_grads are cached so that tests sharing a configuration
# share one compilation (compiles dominate the run time of these tiny problems).
_LEARNERS = all_learners(mask=MLP_MASK)
_OPTS = {"sgd1": optax.sgd(1.0), "adam": optax.adam(1e-2)}


@functools.cache
def cached_step(name, opt="sgd1", **kwargs):
    return train.make_meta_step(_LEARNERS[name], _OPTS[opt], **kwargs)


@functools.cache
def cached_task_grad(name):
    return jax.jit(_LEARNERS[name].task_grad)


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "metasgd", "imaml"])
def test_meta_step_equals_python_loop_over_tasks(name):
    learner = _LEARNERS[name]
    mp = learner.init(mlp_init(jax.random.key(5)))
    tasks = make_tasks(4, 4)
    # the reference: a Python loop over tasks (one task at a time), plain mean
    losses, grads = zip(*[cached_task_grad(name)(mp, index(tasks, t)) for t in range(4)])
    ref_g = jax.tree_util.tree_map(lambda *g: sum(g) / 4, *grads)
    g, m = _grad_via_sgd_step(cached_step(name), mp, tasks, jnp.ones(4))
    assert_tree_close(g, ref_g, rtol=1e-4, atol=1e-6)
    assert float(m["loss"]) == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(float(optax.tree.norm(ref_g)), rel=1e-4)
    if name == "maml":  # weighted mean with non-uniform weights, same compiled step
        w = jnp.asarray([1.0, 2.0, 0.0, 1.0])
        gw, mw = _grad_via_sgd_step(cached_step(name), mp, tasks, w)
        ref_w = jax.tree_util.tree_map(lambda a, b, c, d: (a + 2 * b + d) / 4, *grads)
        assert_tree_close(gw, ref_w, rtol=1e-4, atol=1e-6)
        assert float(mw["weight"]) == 4.0


@pytest.mark.parametrize(
    "name",
    [
        "maml",
        pytest.param("metasgd", marks=pytest.mark.slow),
        pytest.param("imaml", marks=pytest.mark.slow),
    ],
)
def test_chunked_and_padded_meta_step_equal_plain(name):
    learner = _LEARNERS[name]
    mp = learner.init(mlp_init(jax.random.key(5)))
    tasks = make_tasks(4, 4)
    g, m = _grad_via_sgd_step(cached_step(name), mp, tasks, jnp.ones(4))
    # padding to 6 tasks with weight 0 (and poisoning the padding with NaN) changes nothing
    padded, w = pad_tasks(jax.tree_util.tree_map(np.asarray, tasks), 6)
    padded = padded.replace(query=padded.query.replace(y=padded.query.y.copy()))
    padded.query.y[4:] = np.nan
    gp, mpad = _grad_via_sgd_step(cached_step(name), mp, padded, jnp.asarray(w))
    assert bool(mpad["finite"])
    assert_tree_close(gp, g, rtol=1e-5, atol=1e-7)
    assert float(mpad["loss"]) == pytest.approx(float(m["loss"]), rel=1e-6)
    # chunks of 3 (scan over 2 chunks, vmap inside), padded batch
    gc, mc = _grad_via_sgd_step(cached_step(name, chunk_size=3), mp, padded, jnp.asarray(w))
    assert_tree_close(gc, g, rtol=1e-5, atol=1e-7)
    assert float(mc["loss"]) == pytest.approx(float(m["loss"]), rel=1e-6)


def test_jit_equals_nojit_and_vmap_equals_loop_for_task_grad():
    learner = _LEARNERS["maml"]
    params = mlp_init(jax.random.key(6))
    tasks = make_tasks(5, 3)
    lv, gv = jax.jit(jax.vmap(learner.task_grad, in_axes=(None, 0)))(params, tasks)
    l0, g0 = learner.task_grad(params, index(tasks, 0))  # eager, no jit
    assert float(lv[0]) == pytest.approx(float(l0), rel=1e-5)
    assert_tree_close(index(gv, 0), g0, rtol=1e-4, atol=1e-6)
    for t in range(1, 3):
        l, g = cached_task_grad("maml")(params, index(tasks, t))
        assert float(lv[t]) == pytest.approx(float(l), rel=1e-5)
        assert_tree_close(index(gv, t), g, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_meta_step_jit_equals_nojit():
    learner = _LEARNERS["maml"]
    params = mlp_init(jax.random.key(6))
    tasks = make_tasks(5, 4)
    opt = _OPTS["adam"]
    a = train.make_meta_step(learner, opt, jit=False)(params, opt.init(params), tasks, jnp.ones(4))
    b = cached_step("maml", "adam")(params, opt.init(params), tasks, jnp.ones(4))
    assert_tree_close(a, b, rtol=1e-4, atol=1e-6)


def noisy_apply(params, x, *, key=None, train=False):
    """A model with stochastic input dropout when (key, train) are given."""
    if train and key is not None:
        x = x * jax.random.bernoulli(key, 0.7, x.shape) / 0.7
    return mlp_apply(params, x)


def test_seeded_determinism_and_key_dependence():
    learner = meta.maml(noisy_apply, inner_steps=2, inner_lr=0.1)
    params = mlp_init(jax.random.key(7))
    tasks = make_tasks(6, 4)
    opt = optax.adam(1e-2)
    step = train.make_meta_step(learner, opt)

    def run(seed, n=3):
        p, s = params, opt.init(params)
        key = jax.random.key(seed)
        for _ in range(n):
            key, sub = jax.random.split(key)
            p, s, _ = step(p, s, tasks, jnp.ones(4), sub)
        return p

    r1, r2, r3 = run(0), run(0), run(1)
    assert_tree_close(r1, r2, rtol=0, atol=0)
    assert not np.allclose(ravel_pytree(r1)[0], ravel_pytree(r3)[0])


def test_non_finite_loss_keeps_old_params_and_clip_norm():
    params = mlp_init(jax.random.key(9))
    tasks = jax.tree_util.tree_map(np.asarray, make_tasks(8, 4))
    bad = tasks.replace(query=tasks.query.replace(y=tasks.query.y.copy()))
    bad.query.y[1, 0] = np.nan
    opt = _OPTS["adam"]
    state = opt.init(params)
    # warm the optimizer state so that "unchanged" is a real check
    params, state, _ = cached_step("maml", "adam")(params, state, tasks, jnp.ones(4))
    new, new_state, m = cached_step("maml", "adam")(params, state, bad, jnp.ones(4))
    assert not bool(m["finite"])
    assert_tree_close(new, params, rtol=0, atol=0)
    assert_tree_close(new_state, state, rtol=0, atol=0)
    # the same task with weight 0 is fine
    new0, _, m0 = cached_step("maml", "adam")(params, state, bad, jnp.asarray([1.0, 0.0, 1.0, 1.0]))
    assert bool(m0["finite"]) and np.all(np.isfinite(ravel_pytree(new0)[0]))
    # clipping: the applied SGD(1) update has norm clip_norm while grad_norm reports the raw norm
    g, m = _grad_via_sgd_step(cached_step("maml", clip_norm=1e-3), params, tasks, jnp.ones(4))
    assert float(m["grad_norm"]) > 1e-3
    assert float(optax.tree.norm(g)) == pytest.approx(1e-3, rel=1e-3)


def test_bad_arguments_give_clear_errors():
    params = mlp_init(jax.random.key(10))
    tasks = make_tasks(9, 4)
    sgd = _OPTS["sgd1"]
    with pytest.raises(ValueError, match="chunk_size=3 must divide"):
        train.make_meta_step(_LEARNERS["maml"], sgd, chunk_size=3)(
            params, sgd.init(params), tasks, jnp.ones(4)
        )
    with pytest.raises(ValueError, match=r"task_weights must have shape \[4\]"):
        train.make_meta_step(_LEARNERS["maml"], sgd)(params, sgd.init(params), tasks, jnp.ones(3))
    with pytest.raises(ValueError, match="chunk_size"):
        train.make_meta_step(_LEARNERS["maml"], sgd, chunk_size=0)
    with pytest.raises(ValueError, match="unknown meta-learner"):
        meta.make_learner("mamll", mlp_apply)
    with pytest.raises(ValueError, match="inner_data"):
        meta.reptile(mlp_apply, inner_data="query")
    with pytest.raises(ValueError, match="lam"):
        meta.imaml(mlp_apply, lam=0.0)


def test_bf16_compute_keeps_f32_params_and_is_close():
    params = mlp_init(jax.random.key(11))
    tasks = make_tasks(10, 4)
    g32, m32 = _grad_via_sgd_step(cached_step("maml"), params, tasks, jnp.ones(4))
    new, _, m16 = cached_step("maml", compute_dtype=jnp.bfloat16)(
        params, _OPTS["sgd1"].init(params), tasks, jnp.ones(4)
    )
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(new))
    g16 = jax.tree_util.tree_map(jnp.subtract, params, new)
    cos = float(
        jnp.dot(ravel_pytree(g16)[0], ravel_pytree(g32)[0])
        / (optax.tree.norm(g16) * optax.tree.norm(g32))
    )
    assert cos > 0.98
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=0.05)


def test_eval_fn_matches_manual_adaptation_and_chunking():
    learner = _LEARNERS["maml"]
    params = mlp_init(jax.random.key(12))
    tasks = make_tasks(11, 4)
    out = train.make_eval_fn(learner, mlp_apply)(params, tasks)
    outc = train.make_eval_fn(learner, mlp_apply, chunk_size=2)(params, tasks)
    assert out["pred"].shape == (4, 5) and out["mse"].shape == (4,)
    adapt = jax.jit(learner.adapt)
    for t in range(4):
        task = index(tasks, t)
        phi = adapt(params, task.support)
        np.testing.assert_allclose(
            out["pred"][t], mlp_apply(phi, task.query.x), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            out["pred_init"][t], mlp_apply(params, task.query.x), rtol=1e-5, atol=1e-6
        )
        assert float(out["mse"][t]) == pytest.approx(
            float(meta.mse(mlp_apply(phi, task.query.x), task.query.y, task.query.mask)), rel=1e-5
        )
    assert_tree_close(out, outc, rtol=1e-5, atol=1e-6)


_SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    assert jax.device_count() == 8, jax.devices()
    from metarec import meta
    from metarec.meta import step as train
    from tests.unit.meta.test_meta import make_tasks, mlp_init, mlp_apply, MLP_MASK
    from metarec.data.tasks import pad_tasks
    tasks, w = pad_tasks(jax.tree_util.tree_map(np.asarray, make_tasks(0, 14)), 16)
    opt = optax.adam(1e-2)
    mesh = train.make_mesh()
    for name in ["maml"]:
        learner = meta.maml(mlp_apply, inner_steps=3, inner_lr=0.1, adapt_mask=MLP_MASK)
        params = mlp_init(jax.random.key(0))
        ref = train.make_meta_step(learner, opt)(params, opt.init(params), tasks, w)
        for chunk in [8]:
            step = train.make_meta_step(learner, opt, mesh=mesh, chunk_size=chunk)
            p = train.replicate(params, mesh)
            out = step(p, train.replicate(opt.init(params), mesh), train.shard_tasks(tasks, mesh),
                       train.shard_tasks(jnp.asarray(w), mesh))
            leaves = jax.tree_util.tree_leaves(out[0])
            assert all(l.sharding.is_fully_replicated for l in leaves)
            for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    try:  # each device runs chunk_size / 8 of its own tasks per chunk
        train.make_meta_step(learner, opt, mesh=mesh, chunk_size=4)
        raise SystemExit("expected ValueError")
    except ValueError as e:
        assert "multiple of the 8 devices" in str(e)
    sharded = train.shard_tasks(tasks, mesh)
    assert len(sharded.query.y.sharding.device_set) == 8
    try:
        train.shard_tasks(jax.tree_util.tree_map(lambda a: a[:14], tasks), mesh)
        raise SystemExit("expected ValueError")
    except ValueError as e:
        assert "pad_tasks" in str(e)
    print("SHARDING_OK")
    """
)


@pytest.mark.slow  # over 5 s per call in the default suite; CI runs `make test-slow` too
def test_data_parallel_step_on_8_host_devices_matches_single_device():
    res = run_on_host_devices(_SHARDING_SCRIPT, 8)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SHARDING_OK" in res.stdout


# ----------------------------------------------------------------------------------------------
# a synthetic problem with a known answer: per-user linear preferences
# ----------------------------------------------------------------------------------------------


def synthetic_preference_tasks(seed, n_users, n_items=40, d=4, ns=10, nq=10, noise=0.1):
    """Users are tasks. Items have fixed features z_i; user u rates item i with
    ``w_u · z_i + noise`` where w_u = μ + ε_u, ε_u ~ N(0, I), is user specific (μ shared)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_items, d)).astype(np.float32)
    mu = np.array([1.0, -0.5, 0.5, 0.0][:d], np.float32)
    w = mu + rng.normal(size=(n_users, d))
    items = np.argsort(rng.random((n_users, n_items)), axis=1)[:, : ns + nq]
    x = z[items]  # [U, ns+nq, d]
    y = (np.einsum("uid,ud->ui", x, w) + noise * rng.normal(size=items.shape)).astype(np.float32)

    def mk(sl):
        return Examples(
            x=jnp.asarray(x[:, sl]),
            y=jnp.asarray(y[:, sl]),
            mask=jnp.ones(y[:, sl].shape, jnp.float32),
        )

    return Task(support=mk(slice(0, ns)), query=mk(slice(ns, None)), user=jnp.arange(n_users))


def test_maml_adaptation_beats_no_adaptation_on_user_specific_preferences():
    """A tanh MLP over item features, all parameters adapted. After meta-training with MAML,
    adapting on a new user's support set must clearly beat the un-adapted prediction and the
    variance of the query ratings (the best any single global predictor could do)."""
    train_tasks = jax.tree_util.tree_map(np.asarray, synthetic_preference_tasks(0, 250))
    test_tasks = synthetic_preference_tasks(1, 64)
    params = mlp_init(jax.random.key(0), d_in=4, hidden=16)
    learner = meta.maml(mlp_apply, inner_steps=5, inner_lr=0.1)
    opt = optax.adam(1e-2)
    step = train.make_meta_step(learner, opt)
    seen = []
    params, _, history = meta_fit(
        step,
        params,
        opt.init(params),
        train_tasks,
        meta_batch=32,
        epochs=8,
        seed=0,
        callback=lambda i, m: seen.append(i),
    )
    assert len(history) == 8 * 8 and seen == list(range(64))  # 250 tasks -> 8 batches (last padded)
    assert all(m["finite"] for m in history)
    assert history[-1]["weight"] == 250 - 7 * 32 and history[0]["weight"] == 32
    ev = train.make_eval_fn(learner, mlp_apply)(params, test_tasks)
    before, after = float(ev["mse_init"].mean()), float(ev["mse"].mean())
    assert after < 0.4 * before, (before, after)
    # and better than the best single global model (≈ variance of user weights · ||z||² per item)
    y = np.asarray(test_tasks.query.y)
    assert after < 0.4 * float(np.mean((y - y.mean()) ** 2))
