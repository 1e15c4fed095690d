"""The one inner-loop primitive shared by all meta-learners, plus masked losses and parameter masks.

Everything here is a pure function of explicit arguments and works under ``jax.jit``, ``jax.vmap``
and ``jax.grad`` (including second-order differentiation *through* :func:`adapt`).

Parameter masks
---------------
Which parameters the inner loop adapts is given by a *mask*: a pytree with the structure of the
parameters whose leaves are Python ``bool`` (static: ``True`` = adapted, ``False`` = frozen).
Anywhere a mask is accepted one may also pass

* ``None`` — adapt every parameter, or
* a callable ``params -> mask`` (e.g. ``metarec.models.melu.adapt_filter("decision")`` or
  :func:`path_filter`), resolved at trace time against the actual parameter structure.

Frozen leaves are not differentiated in the inner loop at all (no wasted gradient or Hessian work),
but they are still closed over, so an outer ``jax.grad`` through :func:`adapt` does reach them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
MaskLike = Any  # None | bool pytree | Callable[[params], bool pytree]


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over the entries where ``mask`` is non-zero (weighted by ``mask``).

    Returns exactly 0.0 (never NaN, and with a zero — not NaN — gradient) when the mask is all zero,
    so a padded task or an empty support set contributes nothing.
    """
    mask = mask.astype(values.dtype)
    total = jnp.sum(mask)
    return jnp.sum(values * mask) / jnp.maximum(total, jnp.ones_like(total))


def mse(preds: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean squared error over the real examples of one set (``preds``, ``targets``,
    ``mask`` all ``[N]``). An all-padding set gives 0.0."""
    preds = preds.astype(jnp.result_type(preds, targets))
    return masked_mean(jnp.square(preds - targets.astype(preds.dtype)), mask)


def shrunk_mse(prior: float) -> Callable:
    """Squared error summed over the real examples and divided by ``n + prior`` (``n`` = their
    count): :func:`mse` for ``prior = 0``. As an inner loss its gradient step shrinks with few
    examples by ``n / (n + prior)``, as a ridge fold-in's does (a user with 3 ratings moves less
    than one with 90); on a fixed-size query set it only rescales the loss."""
    if not prior >= 0:
        raise ValueError(f"shrunk_mse needs prior >= 0, got {prior}")

    def loss(preds, targets, mask):
        preds = preds.astype(jnp.result_type(preds, targets))
        m = mask.astype(preds.dtype)
        err = jnp.square(preds - targets.astype(preds.dtype))
        return jnp.sum(err * m) / jnp.maximum(jnp.sum(m) + prior, 1.0)

    return loss


def scaled_sse(scale: float) -> Callable:
    """Squared error summed over the real examples, divided by a constant ``scale``: a user with
    more support ratings weighs more in the inner problem, as in MF's per-user ridge problem
    (``scale`` = the query size makes a full query set's loss its MSE)."""
    if not scale > 0:
        raise ValueError(f"scaled_sse needs scale > 0, got {scale}")

    def loss(preds, targets, mask):
        preds = preds.astype(jnp.result_type(preds, targets))
        err = jnp.square(preds - targets.astype(preds.dtype))
        return jnp.sum(err * mask.astype(preds.dtype)) / scale

    return loss


def listnet(preds: jax.Array, targets: jax.Array, mask: jax.Array, temperature: float = 1.0):
    """ListNet's top-one cross-entropy over the real examples of one set: ``−Σ softmax(y/τ)_i ·
    log softmax(preds)_i``, both softmaxes over the masked entries only. A ranking loss: it is
    unchanged when every prediction moves by the same amount, and is minimal (equal to the
    targets' entropy) when ``preds = y/τ + c``. Fewer than two real examples give 0.0."""
    preds = preds.astype(jnp.result_type(preds, targets))
    m = mask.astype(preds.dtype) > 0
    neg = jnp.asarray(-1e30, preds.dtype)
    logp = jax.nn.log_softmax(jnp.where(m, preds, neg))
    q = jax.nn.softmax(jnp.where(m, targets.astype(preds.dtype) / temperature, neg))
    ce = -jnp.sum(jnp.where(m, q * logp, 0.0))
    return jnp.where(jnp.sum(m) > 1, ce, jnp.zeros_like(ce))


def with_rank_term(loss_fn: Callable, weight: float, temperature: float = 1.0) -> Callable:
    """``loss_fn + weight × listnet``: a set loss that also rewards ordering the examples as
    their targets are (an outer loss aimed at nDCG; the inner loop keeps the plain loss)."""
    if not weight >= 0:
        raise ValueError(f"with_rank_term needs weight >= 0, got {weight}")
    if not temperature > 0:
        raise ValueError(f"with_rank_term needs temperature > 0, got {temperature}")

    def loss(preds, targets, mask):
        return loss_fn(preds, targets, mask) + weight * listnet(preds, targets, mask, temperature)

    return loss


def mae(preds: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean absolute error (same conventions as :func:`mse`)."""
    preds = preds.astype(jnp.result_type(preds, targets))
    return masked_mean(jnp.abs(preds - targets.astype(preds.dtype)), mask)


def make_objective(apply_fn: Callable, loss_fn: Callable = mse) -> Callable:
    """Turn a prediction function and a prediction loss into a set objective.

    Returns ``objective(params, examples, key=None) -> scalar`` with
    ``loss_fn(apply_fn(params, examples.x), examples.y, examples.mask)``. When ``key`` is given the
    model is called as ``apply_fn(params, x, key=key, train=True)`` (e.g. MeLU feature dropout);
    without a key it is called as plain ``apply_fn(params, x)``, so any ``f(params, x)`` works.
    """

    def objective(params, examples, key=None):
        if key is None:
            preds = apply_fn(params, examples.x)
        else:
            preds = apply_fn(params, examples.x, key=key, train=True)
        return loss_fn(preds, examples.y, examples.mask)

    return objective


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def path_to_str(path) -> str:
    """Render a ``jax.tree_util`` key path as ``"a/b/0/c"`` (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # pragma: no cover - future key types
            parts.append(str(k))
    return "/".join(parts)


def path_filter(pattern: str | Callable[[str], bool]) -> Callable[[PyTree], PyTree]:
    """A mask builder from parameter paths.

    ``pattern`` is a regular expression searched (``re.search``) in each leaf's path string (see
    :func:`path_to_str`, e.g. ``"mlp_0/kernel"``), or a predicate ``path_str -> bool``. Returns a
    callable ``params -> bool pytree``.
    """
    if isinstance(pattern, str):
        regex = re.compile(pattern)

        def pred(s):
            return regex.search(s) is not None

    elif callable(pattern):
        pred = pattern
    else:
        raise TypeError(
            f"path_filter: pattern must be a regex string or a callable, got {pattern!r}"
        )

    def build(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: bool(pred(path_to_str(p))), params)

    return build


def resolve_mask(mask: MaskLike, params: PyTree) -> list[bool]:
    """Resolve a mask-like (``None`` / callable / bool pytree) to a flat list of Python bools, one
    per leaf of ``params`` (in ``jax.tree_util.tree_leaves`` order). Raises a clear error if the
    mask does not match the parameter structure or has non-static leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if mask is None:
        return [True] * len(leaves)
    if callable(mask):
        mask = mask(params)
    try:
        flat = treedef.flatten_up_to(mask)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "adapt mask does not match the parameter structure: expected a pytree of Python bools "
            f"shaped like params {treedef}, got {jax.tree_util.tree_structure(mask)}"
        ) from e
    out = []
    for m in flat:
        if isinstance(m, (bool, np.bool_)):
            out.append(bool(m))
        else:
            raise TypeError(
                "adapt mask leaves must be static Python bools (True = adapt the whole leaf), "
                f"got {type(m).__name__}"
            )
    if not any(out):
        raise ValueError("adapt mask selects no parameter: at least one leaf must be True")
    return out


def partition(params: PyTree, mask_flat: list[bool]):
    """Split ``params`` into (adapted leaves list, frozen leaves list, combine) where
    ``combine(adapted, frozen)`` rebuilds the full pytree."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if len(leaves) != len(mask_flat):
        raise ValueError(f"mask has {len(mask_flat)} leaves, params have {len(leaves)}")
    adapted = [l for l, m in zip(leaves, mask_flat) if m]
    frozen = [l for l, m in zip(leaves, mask_flat) if not m]

    def combine(a, f):
        a_it, f_it = iter(a), iter(f)
        return jax.tree_util.tree_unflatten(
            treedef, [next(a_it) if m else next(f_it) for m in mask_flat]
        )

    return adapted, frozen, combine


def _flat_lr(lr, params, mask_flat):
    """Per-adapted-leaf learning rates from a scalar or a params-shaped pytree."""
    n_adapt = sum(mask_flat)
    if isinstance(lr, (int, float)) or (hasattr(lr, "shape") and jnp.ndim(lr) == 0):
        return [lr] * n_adapt
    treedef = jax.tree_util.tree_structure(params)
    try:
        flat = treedef.flatten_up_to(lr)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "lr must be a scalar or a pytree with the structure of params "
            f"({treedef}), got {jax.tree_util.tree_structure(lr)}"
        ) from e
    return [l for l, m in zip(flat, mask_flat) if m]


# ----------------------------------------------------------------------------------------------
# The inner loop
# ----------------------------------------------------------------------------------------------
_ARMIJO_C = 1e-4  # sufficient-decrease constant
_ROUNDOFF = 1e-6  # Hager-Zhang allowance eps*|f| for round-off in the loss comparison


def _armijo_scale(inner_loss, a, k, loss, g, lrs, max_halvings):
    """Step scale ``s = 2^-j`` (first ``j`` in 0..max_halvings meeting the Armijo condition, see
    :func:`adapt`), or 0.0 when none does. Treated as a constant (no gradient)."""
    a, g, loss = jax.lax.stop_gradient((a, g, loss))
    lrs = [jax.lax.stop_gradient(jnp.asarray(r)) for r in lrs]

    def f32(x):
        return jnp.asarray(x, jnp.float32)

    slope = sum(jnp.sum(f32(r) * jnp.square(f32(gi))) for r, gi in zip(lrs, g))  # Σ lr·|g|²
    f0 = f32(loss)
    allowance = _ROUNDOFF * jnp.abs(f0)

    def ok(s):
        trial = [
            p - (s.astype(p.dtype) * jnp.asarray(r, p.dtype)) * gi for p, r, gi in zip(a, lrs, g)
        ]
        ft = f32(inner_loss(trial, k))
        return jnp.isfinite(ft) & (ft <= f0 - _ARMIJO_C * s * slope + allowance)

    def cond(c):
        j, accepted = c
        return (~accepted) & (j <= max_halvings)

    def body(c):
        j, _ = c
        accepted = ok(jnp.exp2(-j.astype(jnp.float32)))
        return jnp.where(accepted, j, j + 1), accepted

    j, accepted = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), jnp.zeros((), bool)))
    return jnp.where(accepted, jnp.exp2(-j.astype(jnp.float32)), 0.0)


def adapt(
    params: PyTree,
    support,
    loss_fn: Callable,
    *,
    steps: int,
    lr,
    mask: MaskLike = None,
    first_order: bool = False,
    remat: bool = False,
    key: jax.Array | None = None,
    return_losses: bool = False,
    backtrack: int = 0,
    newton: float = 0.0,
):
    """K steps of gradient descent on the selected parameters (``lax.scan``).

    Args:
      params: model parameters (any pytree of arrays); the starting point θ.
      support: the set to adapt on (usually :class:`metarec.data.tasks.Examples`), passed unchanged
        to ``loss_fn``.
      loss_fn: ``loss_fn(params, support) -> scalar`` (e.g. from :func:`make_objective`); when
        ``key`` is given it is called as ``loss_fn(params, support, key_k)`` with a fresh key per
        step.
      steps: number of inner steps K (static Python int, may be 0).
      lr: inner learning rate: a scalar, or a pytree shaped like ``params`` (per-parameter rates,
        possibly traced — Meta-SGD differentiates through them).
      mask: which parameters to adapt (see module docstring); the others stay fixed.
      first_order: stop the gradient through the inner gradients (FOMAML): then
        ``d φ / d θ = I`` in the outer derivative.
      remat: ``jax.checkpoint`` each inner step, so second-order memory does not grow with ``steps``
        (recomputes the forward pass of each step during the backward pass).
      key: optional PRNG key for a stochastic loss (e.g. feature dropout).
      return_losses: also return the ``[steps]`` support losses *before* each step.
      backtrack: 0 (default) = plain gradient descent. ``> 0`` = a *safeguarded* step: each step
        uses the largest ``s = 2^-j`` (``j = 0..backtrack``) whose trial point satisfies the Armijo
        condition ``f(a - s·lr·g) <= f(a) - 1e-4·s·Σ lr·|g|² + 1e-6·|f(a)|`` (the last term is the
        Hager–Zhang round-off allowance, so a converged solve is not stalled by float noise); if no
        ``s`` does, the parameters are left unchanged for that step. When the full step already
        decreases the loss it is taken unchanged (plain GD), but a step size too large for the
        local curvature (``lr > 2/λ_max``) can no longer make the loss — and the parameters —
        explode. The trial losses use the same dropout key as the step's gradient. The choice of
        ``s`` is not differentiated (``stop_gradient``); costs up to ``backtrack + 1`` extra
        forward passes per step (a ``lax.while_loop`` that stops at the first accepted ``s``).

      newton: 0 (default) = gradient steps. ``> 0`` = damped Newton steps for a few adapted
        parameters (e.g. a user vector; at most ``MAX_NEWTON_DIM`` in all): each step is
        ``a ← a − lr ⊙ (H + newton·I)⁻¹ g`` with the exact Hessian ``H`` of the support loss. On a
        loss quadratic in ``a`` one step with ``lr = 1`` is the ridge solution
        ``argmin_a L(a) + newton/2 |a − a_0|²`` around the starting point — closed-form fold-in,
        differentiable (MAML/Meta-SGD differentiate through the solve; ``first_order`` stops
        the gradient through the step). Not combined with ``backtrack``; ``remat`` is not used.

    Returns:
      The adapted parameters φ (same structure as ``params``), and the losses if requested.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"adapt: steps must be a non-negative Python int, got {steps!r}")
    if not isinstance(backtrack, int) or backtrack < 0:
        raise ValueError(f"adapt: backtrack must be a non-negative Python int, got {backtrack!r}")
    if not newton >= 0 or (newton and backtrack):
        raise ValueError(
            f"adapt: newton must be >= 0 and not combined with backtrack, got {newton}"
        )
    mask_flat = resolve_mask(mask, params)
    adapted, frozen, combine = partition(params, mask_flat)
    lrs = _flat_lr(lr, params, mask_flat)
    if newton:
        return _adapt_newton(
            adapted,
            frozen,
            combine,
            support,
            loss_fn,
            steps,
            lrs,
            newton,
            key,
            return_losses,
            first_order,
        )

    def inner_loss(a, k):
        full = combine(a, frozen)
        return loss_fn(full, support) if k is None else loss_fn(full, support, k)

    def step(a, i):
        k = None if key is None else jax.random.fold_in(key, i)
        loss, g = jax.value_and_grad(inner_loss)(a, k)
        if first_order:
            g = jax.lax.stop_gradient(g)
        if backtrack:
            scale = _armijo_scale(inner_loss, a, k, loss, g, lrs, backtrack)
            new = [
                p - (scale.astype(p.dtype) * jnp.asarray(r, p.dtype)) * gi
                for p, r, gi in zip(a, lrs, g)
            ]
        else:
            new = [p - jnp.asarray(r, p.dtype) * gi for p, r, gi in zip(a, lrs, g)]
        return new, loss

    if remat:
        step = jax.checkpoint(step)

    if steps == 0:
        out, losses = adapted, jnp.zeros((0,), jnp.float32)
    else:
        out, losses = jax.lax.scan(step, adapted, jnp.arange(steps))
    phi = combine(out, frozen)
    return (phi, losses) if return_losses else phi


MAX_NEWTON_DIM = 512  # adapted parameters a Newton inner step solves for at most


def _adapt_newton(
    adapted, frozen, combine, support, loss_fn, steps, lrs, damping, key, losses_out, first_order
):
    """The ``newton > 0`` branch of :func:`adapt`: damped Newton steps on the flattened leaves."""
    from jax.flatten_util import ravel_pytree

    flat0, unravel = ravel_pytree(adapted)
    if flat0.size > MAX_NEWTON_DIM:
        raise ValueError(
            f"adapt: newton steps solve for at most {MAX_NEWTON_DIM} adapted parameters, the mask "
            f"selects {flat0.size}; adapt fewer parameters or use gradient steps (newton=0)"
        )
    rate = ravel_pytree(
        [jnp.broadcast_to(jnp.asarray(r, p.dtype), p.shape) for p, r in zip(adapted, lrs)]
    )[0]
    eye = jnp.eye(flat0.size, dtype=flat0.dtype)

    def f(v, k):
        full = combine(unravel(v), frozen)
        return loss_fn(full, support) if k is None else loss_fn(full, support, k)

    def step(v, i):
        k = None if key is None else jax.random.fold_in(key, i)
        loss, g = jax.value_and_grad(f)(v, k)
        h = jax.hessian(f)(v, k)
        delta = jnp.linalg.solve(h + damping * eye, g)
        if first_order:
            delta = jax.lax.stop_gradient(delta)
        return v - rate * delta, loss

    if steps == 0:
        out, losses = flat0, jnp.zeros((0,), jnp.float32)
    else:
        out, losses = jax.lax.scan(step, flat0, jnp.arange(steps))
    phi = combine(unravel(out), frozen)
    return (phi, losses) if losses_out else phi
