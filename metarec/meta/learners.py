"""Meta-learners as small NamedTuples of pure functions (like ``optax.GradientTransformation``).

Every learner is built on the one inner-loop primitive :func:`metarec.meta.inner.adapt`; they differ
only in how the outer (meta) gradient of ONE task is formed:

========  =====================================================================================
maml      exact second-order ``jax.grad`` of the query loss through the K inner steps.
fomaml    the same with the inner gradients under ``stop_gradient`` (dφ/dθ := I): the meta
          gradient is ∇_φ L_query(φ) evaluated at the adapted parameters.
metasgd   MAML where the per-parameter inner learning rates are meta-parameters too.
reptile   "gradient" = θ − φ (see :func:`reptile`).
imaml     implicit gradient of a proximal inner problem, solved with conjugate gradient on
          Hessian-vector products (no back-propagation through the inner loop).
========  =====================================================================================

All learners expose the same interface (:class:`MetaLearner`)::

    meta_params = learner.init(params)                 # model params -> meta params
    phi         = learner.adapt(meta_params, support)   # adapted *model* params (used at test time)
    loss, g     = learner.task_grad(meta_params, task)  # ONE task; g has meta_params' structure
    theta       = learner.model_params(meta_params)     # the initialisation (before adaptation)

``task_grad`` returns a gradient to be *minimised* by a standard optax optimizer (the meta step in
:mod:`metarec.meta.step` vmaps it over tasks and averages). An optional ``key`` drives a stochastic
model (e.g. MeLU feature dropout): it is split into one key for the inner loop (a fresh sub-key per
inner step) and one for the query loss. Without a key the model is called deterministically.

``apply_fn(params, x) -> preds [N]`` works on ONE task's inputs; ``loss_fn(preds, y, mask)`` is a
masked set loss (default :func:`metarec.meta.inner.mse`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metarec.meta import inner as _inner
from metarec.meta.inner import MaskLike, make_objective, mse

PyTree = Any


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as pure functions. See the module docstring."""

    init: Callable[[PyTree], PyTree]
    adapt: Callable[..., PyTree]
    task_grad: Callable[..., tuple[jax.Array, PyTree]]
    model_params: Callable[[PyTree], PyTree]
    name: str


class MetaSGDParams(NamedTuple):
    """Meta-parameters of Meta-SGD: the initialisation ``params`` and per-parameter inner learning
    rates ``lr`` (same structure and shapes as ``params``; rates of frozen leaves are unused)."""

    params: PyTree
    lr: PyTree


def _split(key):
    if key is None:
        return None, None
    k_inner, k_query = jax.random.split(key)
    return k_inner, k_query


def _check_common(inner_steps, inner_lr):
    if not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a non-negative int, got {inner_steps!r}")
    if isinstance(inner_lr, (int, float)) and inner_lr < 0:
        raise ValueError(f"inner_lr must be >= 0, got {inner_lr!r}")


def _identity(p):
    return p


# ----------------------------------------------------------------------------------------------
# MAML / FOMAML
# ----------------------------------------------------------------------------------------------
def _through_inner_loop(
    apply_fn: Callable,
    loss_fn: Callable,
    *,
    inner_steps: int,
    adapt_mask: MaskLike,
    first_order: bool,
    remat: bool,
    name: str,
    init: Callable[[PyTree], PyTree],
    split: Callable[[PyTree], tuple[PyTree, Any]],
    newton: float = 0.0,
    query_loss_fn: Callable | None = None,
) -> MetaLearner:
    """The core MAML and Meta-SGD share: adapt with the inner loop, score the query set, and
    differentiate through the inner steps. ``split(meta_params) -> (params, inner_lr)`` is where
    they differ (a fixed rate, or learned per-parameter rates carried in the meta-parameters)."""
    objective = make_objective(apply_fn, loss_fn)
    query_objective = (
        objective if query_loss_fn is None else make_objective(apply_fn, query_loss_fn)
    )

    def adapt(meta_params, support, key=None):
        params, lr = split(meta_params)
        return _inner.adapt(
            params,
            support,
            objective,
            steps=inner_steps,
            lr=lr,
            mask=adapt_mask,
            first_order=first_order,
            remat=remat,
            key=key,
            newton=newton,
        )

    def meta_loss(meta_params, task, key=None):
        k_inner, k_query = _split(key)
        phi = adapt(meta_params, task.support, k_inner)
        return query_objective(phi, task.query, k_query)

    def task_grad(meta_params, task, key=None):
        return jax.value_and_grad(meta_loss)(meta_params, task, key)

    return MetaLearner(
        init=init,
        adapt=adapt,
        task_grad=task_grad,
        model_params=lambda mp: split(mp)[0],
        name=name,
    )


def maml(
    apply_fn: Callable,
    loss_fn: Callable = mse,
    *,
    inner_steps: int = 5,
    inner_lr=1e-2,
    adapt_mask: MaskLike = None,
    first_order: bool = False,
    remat: bool = False,
    name: str | None = None,
    newton: float = 0.0,
    query_loss_fn: Callable | None = None,
) -> MetaLearner:
    """MAML (Finn et al., 2017) with the exact second-order meta-gradient.

    ``task_grad(θ, task) = ∇_θ L_query(adapt(θ, support))`` computed by ``jax.value_and_grad``
    through the ``lax.scan`` inner loop (Hessian-vector products included). Frozen parameters (mask
    False) are not adapted but still receive meta-gradients through both the inner and the query
    loss. ``first_order=True`` gives FOMAML; ``remat=True`` checkpoints each inner step.

    Args:
      apply_fn: ``apply_fn(params, x) -> preds`` (and ``apply_fn(params, x, key=, train=True)``
        if keys are used).
      loss_fn: masked set loss ``(preds, y, mask) -> scalar``.
      inner_steps: K inner gradient steps.
      inner_lr: inner step size (scalar or params-shaped pytree).
      adapt_mask: which parameters the inner loop adapts (``None`` = all, bool pytree or callable).
      first_order: drop the second-order term.
      remat: rematerialise each inner step (memory independent of ``inner_steps``).
      newton: > 0: damped Newton inner steps with this damping instead of gradient steps (for a
        few adapted parameters; see :func:`metarec.meta.inner.adapt`).
      query_loss_fn: the outer (query-set) loss; ``None`` = ``loss_fn``. E.g.
        :func:`metarec.meta.inner.with_rank_term` to meta-learn for ranking while the inner loop
        still fits ratings.
    """
    _check_common(inner_steps, inner_lr)
    return _through_inner_loop(
        apply_fn,
        loss_fn,
        inner_steps=inner_steps,
        adapt_mask=adapt_mask,
        first_order=first_order,
        remat=remat,
        name=name or ("fomaml" if first_order else "maml"),
        init=_identity,
        split=lambda params: (params, inner_lr),
        newton=newton,
        query_loss_fn=query_loss_fn,
    )


def fomaml(apply_fn: Callable, loss_fn: Callable = mse, **kwargs) -> MetaLearner:
    """First-order MAML: :func:`maml` with ``first_order=True``. Its meta-gradient is
    ``∇_φ L_query(φ)`` at the adapted parameters (the Jacobian dφ/dθ replaced by the identity)."""
    kwargs.pop("first_order", None)
    return maml(apply_fn, loss_fn, first_order=True, **kwargs)


# ----------------------------------------------------------------------------------------------
# Meta-SGD
# ----------------------------------------------------------------------------------------------
def scale_inner_rates(meta_params: MetaSGDParams, scale: float) -> MetaSGDParams:
    """Meta-SGD meta-parameters with every learned inner rate times ``scale`` (0: the
    initialisation, not adapted); the initialisation itself is unchanged."""
    if not isinstance(meta_params, MetaSGDParams):
        raise TypeError(f"learned inner rates need MetaSGDParams, got {type(meta_params).__name__}")
    return meta_params._replace(lr=jax.tree_util.tree_map(lambda a: a * scale, meta_params.lr))


def metasgd(
    apply_fn: Callable,
    loss_fn: Callable = mse,
    *,
    inner_steps: int = 1,
    inner_lr: float = 1e-2,
    adapt_mask: MaskLike = None,
    first_order: bool = False,
    remat: bool = False,
    name: str = "metasgd",
    newton: float = 0.0,
    query_loss_fn: Callable | None = None,
) -> MetaLearner:
    """Meta-SGD (Li et al., 2017): MAML whose inner learning rates are learned per parameter.

    ``init(params)`` returns :class:`MetaSGDParams` with every rate set to ``inner_lr``;
    ``task_grad`` differentiates the query loss w.r.t. both the initialisation and the rates
    (rates may become negative, as in the paper). The paper uses a single inner step
    (``inner_steps=1`` default here), but any K works. With ``newton > 0`` the learned rates scale
    damped Newton steps per parameter (:func:`metarec.meta.inner.adapt`); ``query_loss_fn`` as
    in :func:`maml`.
    """
    _check_common(inner_steps, inner_lr)

    def init(params):
        lr = jax.tree_util.tree_map(
            lambda p: jnp.full(jnp.shape(p), inner_lr, jnp.result_type(p)), params
        )
        return MetaSGDParams(params=params, lr=lr)

    return _through_inner_loop(
        apply_fn,
        loss_fn,
        inner_steps=inner_steps,
        adapt_mask=adapt_mask,
        first_order=first_order,
        remat=remat,
        name=name,
        init=init,
        split=lambda mp: (mp.params, mp.lr),
        newton=newton,
        query_loss_fn=query_loss_fn,
    )


# ----------------------------------------------------------------------------------------------
# Reptile
# ----------------------------------------------------------------------------------------------
def _concat_examples(a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def reptile(
    apply_fn: Callable,
    loss_fn: Callable = mse,
    *,
    inner_steps: int = 5,
    inner_lr=1e-2,
    adapt_mask: MaskLike = None,
    inner_data: str = "support",
    remat: bool = False,
    name: str = "reptile",
) -> MetaLearner:
    """Reptile (Nichol et al., 2018).

    Gradient convention: ``task_grad`` returns ``g = θ − φ`` where φ are the parameters after K
    inner SGD steps from θ. Feeding ``g`` to ``optax.sgd(ε)`` gives exactly the Reptile update
    ``θ ← θ + ε (φ − θ)``; averaging over tasks gives batched Reptile. (Adam etc. on this
    pseudo-gradient also work, as in the original code.) Leaves outside ``adapt_mask`` get g = 0, so
    with a partial mask they are never meta-trained — use the full mask (``None``) for Reptile
    unless that is the intent.

    ``inner_data``: ``"support"`` (default; the same data as test-time adaptation) or
    ``"support+query"`` (all of the task's ratings, as in Reptile's original formulation).
    The returned loss is the query loss of φ (a training loss when the query is used in the inner
    loop).
    """
    _check_common(inner_steps, inner_lr)
    if inner_data not in ("support", "support+query"):
        raise ValueError(
            f"reptile: inner_data must be 'support' or 'support+query', got {inner_data!r}"
        )
    objective = make_objective(apply_fn, loss_fn)

    def adapt(params, support, key=None):
        return _inner.adapt(
            params,
            support,
            objective,
            steps=inner_steps,
            lr=inner_lr,
            mask=adapt_mask,
            first_order=True,
            remat=remat,
            key=key,
        )

    def task_grad(params, task, key=None):
        k_inner, k_query = _split(key)
        data = (
            task.support if inner_data == "support" else _concat_examples(task.support, task.query)
        )
        phi = adapt(params, data, k_inner)
        loss = objective(phi, task.query, k_query)
        g = jax.tree_util.tree_map(lambda t, p: t - p, params, phi)
        return jax.lax.stop_gradient(loss), jax.lax.stop_gradient(g)

    return MetaLearner(
        init=_identity, adapt=adapt, task_grad=task_grad, model_params=_identity, name=name
    )


# ----------------------------------------------------------------------------------------------
# iMAML
# ----------------------------------------------------------------------------------------------
def _tree_vdot(a, b):
    out = jnp.zeros((), jnp.float32)
    for x, y in zip(a, b):
        # accumulate in at least f32
        dt = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
        out = out + jnp.vdot(x.astype(dt), y.astype(dt))
    return out


def cg_solve(matvec: Callable, b: list, steps: int, *, tol: float = 0.0) -> list:
    """Truncated conjugate gradient for ``matvec(x) = b``: at most ``steps`` iterations
    (``lax.scan``) from x = 0; ``b`` and ``x`` are lists of arrays. Exact after ``dim`` steps for a
    symmetric positive-definite operator.

    Stopping rules (standard truncated / Newton-CG, Nocedal & Wright Alg. 7.1): the iteration stops
    — ``x`` is frozen for the remaining steps — when

    * the residual is small: ``|r| <= tol·|b|`` (``tol=0``: only an exactly zero residual), or
    * a direction of non-positive curvature ``pᵀAp <= 0`` is met (the operator is not positive
      definite there, e.g. ``I + H/lam`` with an indefinite Hessian away from a minimum). CG's
      step ``|r|²/pᵀAp`` would then move *up* the quadratic model, or with ``pᵀAp ≈ 0`` jump
      arbitrarily far; instead the iterate so far is returned, or ``b`` itself (the steepest-descent
      direction, i.e. the operator replaced by I) if it happens at the very first step.

    The result never involves a division by a non-positive or zero quantity, so it stays finite for
    finite inputs, and ``|x|`` is bounded by the positive-curvature part of the Krylov space.
    """
    x0 = [jnp.zeros_like(v) for v in b]
    rs0 = _tree_vdot(b, b)
    stop_rs = jnp.square(jnp.asarray(tol, jnp.float32)) * rs0

    def body(carry, _):
        x, r, p, rs, done, first = carry
        done = done | (rs <= stop_rs) | ~(rs > 0)
        ap = matvec(p)
        pap = _tree_vdot(p, ap)
        neg = ~(pap > 0) & ~done  # non-positive curvature (or NaN): stop here
        step = ~done & ~neg
        alpha = jnp.where(step, rs / jnp.where(step, pap, 1.0), 0.0)
        # negative curvature on the first direction (p = b): fall back to x = b
        fallback = neg & first
        x = [
            jnp.where(fallback, bi, xi + (alpha * pi).astype(xi.dtype))
            for xi, pi, bi in zip(x, p, b)
        ]
        r = [ri - (alpha * api).astype(ri.dtype) for ri, api in zip(r, ap)]
        rs_new = jnp.where(step, _tree_vdot(r, r), rs)
        beta = jnp.where(step, rs_new / jnp.where(step, rs, 1.0), 0.0)
        p = [jnp.where(step, ri + (beta * pi).astype(ri.dtype), pi) for ri, pi in zip(r, p)]
        return (x, r, p, rs_new, done | neg, jnp.zeros((), bool)), None

    init = (x0, list(b), list(b), rs0, jnp.zeros((), bool), jnp.ones((), bool))
    (x, _, _, _, _, _), _ = jax.lax.scan(body, init, None, length=steps)
    return x


def imaml(
    apply_fn: Callable,
    loss_fn: Callable = mse,
    *,
    inner_steps: int = 10,
    inner_lr=1e-2,
    adapt_mask: MaskLike = None,
    lam: float = 1.0,
    cg_steps: int = 5,
    cg_tol: float = 1e-6,
    backtrack: int = 10,
    name: str = "imaml",
) -> MetaLearner:
    """Implicit MAML (Rajeswaran et al., 2019).

    Inner problem (also used at test time): ``φ* = argmin_φ L_s(φ) + lam/2 ||φ_a − θ_a||²`` over the
    adapted leaves ``a`` (frozen leaves f stay at θ_f), approximated by ``inner_steps`` gradient
    steps from θ (no back-propagation through them). At the optimum the implicit function theorem
    gives

    * adapted leaves: ``g_a = (I + H/lam)^{-1} ∇_φ L_q(φ*)`` with ``H = ∇²_φ L_s(φ*)``, solved with
      ``cg_steps`` of conjugate gradient on Hessian-vector products (forward-over-reverse);
    * frozen leaves (exact extension, not in the paper, which adapts everything):
      ``g_f = ∂_f L_q(φ*) − (1/lam) ∂_f ⟨∇_φ L_s(φ*, θ_f), v⟩`` with v = g_a above.

    The Hessian terms use the deterministic loss (no dropout key), the inner loop uses the key.

    Safeguards (both inactive on a well-conditioned convex problem, where the result is unchanged):

    * the inner solve takes *safeguarded* gradient steps (:func:`metarec.meta.inner.adapt` with
      ``backtrack``: a step is halved up to ``backtrack`` times until the proximal objective
      decreases (Armijo)). Plain fixed-step GD diverges as soon as the support-loss curvature
      exceeds ``2/inner_lr − lam``, and nothing in the implicit gradient (which ignores the inner
      path) keeps meta-training away from such sharp initialisations (BUILD_NOTES.md, "Stability").
      With the safeguard every step decreases the proximal objective (up to a 1e-6 relative
      round-off allowance, under the step's dropout key), so ``|φ − θ|² ≲ 2 L_s(θ)/lam`` stays
      bounded. ``backtrack=0`` restores plain GD.
    * CG stops at a non-positive-curvature direction of ``I + H/lam`` (indefinite when φ is not a
      minimum) and once the relative residual is below ``cg_tol`` (see :func:`cg_solve`).
    """
    _check_common(inner_steps, inner_lr)
    if not isinstance(backtrack, int) or backtrack < 0:
        raise ValueError(f"imaml: backtrack must be a non-negative int, got {backtrack!r}")
    if not cg_tol >= 0:
        raise ValueError(f"imaml: cg_tol must be >= 0, got {cg_tol!r}")
    if not lam > 0:
        raise ValueError(f"imaml: lam must be > 0, got {lam!r}")
    if not isinstance(cg_steps, int) or cg_steps < 1:
        raise ValueError(f"imaml: cg_steps must be a positive int, got {cg_steps!r}")
    objective = make_objective(apply_fn, loss_fn)

    def adapt(params, support, key=None):
        mask_flat = _inner.resolve_mask(adapt_mask, params)
        anchor = jax.lax.stop_gradient(params)
        anchor_a, _, _ = _inner.partition(anchor, mask_flat)

        def prox_objective(phi, ex, k=None):
            phi_a, _, _ = _inner.partition(phi, mask_flat)
            prox = sum(jnp.sum(jnp.square(p - t)) for p, t in zip(phi_a, anchor_a))
            return objective(phi, ex, k) + 0.5 * lam * prox

        return _inner.adapt(
            anchor,
            support,
            prox_objective,
            steps=inner_steps,
            lr=inner_lr,
            mask=mask_flat_tree(params, mask_flat),
            first_order=True,
            key=key,
            backtrack=backtrack,
        )

    def task_grad(params, task, key=None):
        k_inner, k_query = _split(key)
        mask_flat = _inner.resolve_mask(adapt_mask, params)
        phi = jax.lax.stop_gradient(adapt(params, task.support, k_inner))
        phi_a, _, combine = _inner.partition(phi, mask_flat)
        _, theta_f, _ = _inner.partition(params, mask_flat)

        def q_loss(a, f):
            return objective(combine(a, f), task.query, k_query)

        loss, (gq_a, gq_f) = jax.value_and_grad(q_loss, argnums=(0, 1))(phi_a, theta_f)

        def grad_s(a, f):
            return jax.grad(lambda a_: objective(combine(a_, f), task.support))(a)

        def matvec(v):
            hv = jax.jvp(lambda a: grad_s(a, theta_f), (phi_a,), (v,))[1]
            return [vi + hvi / lam for vi, hvi in zip(v, hv)]

        v = cg_solve(matvec, gq_a, cg_steps, tol=cg_tol)
        if theta_f:
            _, vjp_f = jax.vjp(lambda f: grad_s(phi_a, f), theta_f)
            (mixed,) = vjp_f(v)
            g_f = [g - m / lam for g, m in zip(gq_f, mixed)]
        else:
            g_f = []
        return loss, combine(v, g_f)

    return MetaLearner(
        init=_identity, adapt=adapt, task_grad=task_grad, model_params=_identity, name=name
    )


def mask_flat_tree(params, mask_flat):
    """Rebuild a bool pytree shaped like ``params`` from a flat list of bools."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), list(mask_flat))
