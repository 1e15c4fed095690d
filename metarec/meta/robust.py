"""Adversarial perturbations of embedding tables (APR-style) and adversarial meta-training.

Threat model (He et al., 2018, "Adversarial Personalized Ranking", on MF embeddings): the attacker
adds a perturbation ``delta`` to the rows of embedding tables the model reads (flax ``nn.Embed``
``embedding`` leaves selected by a path regex, by default the hybrid model's MF item tables
``item_factors`` and ``item_bias``). Every row of every selected table lies in its own L2 ball:
``|delta[v]|_2 <= r`` with

* ``relative=True`` (default): ``r = eps x RMS`` of the table's non-zero row norms (so one ``eps``
  means the same relative size for an 8-dimensional factor table and a 1-dimensional bias table;
  zero rows -- the out-of-vocabulary row, items without ratings -- are left out of the RMS);
* ``relative=False``: ``r = eps`` in the table's own units.

The attacker knows the model and its meta-parameters (white box) and the task's support and query
sets, and maximises the query loss AFTER the learner has adapted on the support set; the
perturbed rows are read by both the adaptation and the prediction (``where="both"``), or only by
one of them (``"inner"``: adaptation only, ``"outer"``: prediction only).

Attacks (:func:`make_attack`): FGSM, one steepest-ascent step to the surface of every row's ball
(``delta[v] = r g[v] / |g[v]|``, the exact maximiser of the linearised loss over the product of
balls), and PGD, ``steps`` projected normalised-gradient steps of size ``step_size`` (default
``2.5 r / steps``) from a zero, random (uniform in the ball) or FGSM start, returning the iterate
with the highest loss met (including the start, so PGD from the FGSM start is never weaker than
FGSM). ``eps`` may be a traced value: one compilation serves every budget.

Gradient path: a model that freezes its tables with ``jax.lax.stop_gradient`` INSIDE the module
(the hybrid model with ``freeze_tables=True``) gives a zero gradient w.r.t. a perturbation of those
rows. The attack therefore takes its gradient through ``attack_learner`` / ``attack_apply_fn``,
the same model built with ``freeze_tables=False`` (identical forward values); the meta-gradient of
adversarial training still goes through the frozen model.

Adversarial meta-training (:func:`adversarial`): a :class:`~metarec.meta.learners.MetaLearner`
whose ``task_grad`` is the gradient of ``(1 - lam) x clean + lam x adversarial`` query loss (APR's
form, with APR's ``lambda = 1`` being ``lam = 0.5`` up to a factor 2), the perturbation found by
the attack at the current meta-parameters and held fixed (``stop_gradient``, Danskin). It plugs into
:func:`metarec.meta.step.make_meta_step` unchanged; ``eps = 0`` or ``lam = 0`` returns the base
learner itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metarec.meta.inner import make_objective, mse, path_to_str
from metarec.meta.learners import MetaLearner

PyTree = Any
DEFAULT_FILTER = r"^item_(factors|bias)/embedding$"
METHODS = ("fgsm", "pgd")
STARTS = ("zero", "random", "fgsm")
WHERE = ("both", "inner", "outer")


# ----------------------------------------------------------------------------------------------
# tables, balls, perturbed parameters
# ----------------------------------------------------------------------------------------------
def table_mask(params: PyTree, pattern: str = DEFAULT_FILTER) -> list[bool]:
    """Flat mask (``tree_leaves`` order) of the 2-D ``embedding`` leaves whose path matches
    ``pattern`` (``re.search`` on e.g. ``"item_factors/embedding"``); ``ValueError`` if none."""
    regex = re.compile(pattern)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    mask = [
        path_to_str(p).endswith("embedding")
        and jnp.ndim(a) == 2
        and regex.search(path_to_str(p)) is not None
        for p, a in flat
    ]
    if not any(mask):
        names = [path_to_str(p) for p, a in flat if path_to_str(p).endswith("embedding")]
        raise ValueError(
            f"attack filter {pattern!r} selects no 2-D embedding table; tables: {', '.join(names)}"
        )
    return mask


def selected(params: PyTree, mask: list[bool]) -> list[jax.Array]:
    """The selected leaves of ``params`` (in ``tree_leaves`` order)."""
    return [a for a, m in zip(jax.tree_util.tree_leaves(params), mask) if m]


def radii(tables: list[jax.Array], eps, relative: bool = True) -> list[jax.Array]:
    """Per-table row radius: ``eps`` x the RMS of the non-zero row norms (``relative``) or ``eps``;
    not differentiated (a constant of the threat model)."""
    out = []
    for t in tables:
        t = jax.lax.stop_gradient(t).astype(jnp.float32)
        if relative:
            sq = jnp.sum(jnp.square(t), axis=-1)
            n = jnp.sum(sq > 0)
            rms = jnp.sqrt(jnp.sum(sq) / jnp.maximum(n, 1))
            out.append(jnp.asarray(eps, jnp.float32) * rms)
        else:
            out.append(jnp.asarray(eps, jnp.float32))
    return out


def _row_norm(d):
    return jnp.sqrt(jnp.sum(jnp.square(d), axis=-1, keepdims=True))


def project(delta: list[jax.Array], r: list[jax.Array]) -> list[jax.Array]:
    """Every row of every table back into its ball ``|row| <= r``."""
    out = []
    for d, ri in zip(delta, r):
        n = _row_norm(d)
        out.append(d * jnp.minimum(1.0, ri / jnp.maximum(n, 1e-12)))
    return out


def _unit_rows(g):
    """``g / |g|`` per row (0 for an all-zero row: a row the task does not read)."""
    n = _row_norm(g)
    return jnp.where(n > 0, g / jnp.where(n > 0, n, 1.0), 0.0)


def add_delta(params: PyTree, mask: list[bool], delta: list[jax.Array], sign: float = 1.0):
    """``params`` with ``sign x delta`` added to the selected leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    it = iter(delta)
    new = [(a + sign * next(it).astype(a.dtype)) if m else a for a, m in zip(leaves, mask)]
    return jax.tree_util.tree_unflatten(treedef, new)


def perturb_meta(meta_params, mask: list[bool], delta, sign: float = 1.0):
    """Meta-parameters whose model parameters carry the perturbation (Meta-SGD's ``(params, lr)``
    keeps its rates)."""
    if hasattr(meta_params, "_replace") and hasattr(meta_params, "params"):
        return meta_params._replace(params=add_delta(meta_params.params, mask, delta, sign))
    return add_delta(meta_params, mask, delta, sign)


def _split(key):
    if key is None:
        return None, None
    k_inner, k_query = jax.random.split(key)
    return k_inner, k_query


def perturbed_loss(
    learner: MetaLearner,
    apply_fn: Callable,
    loss_fn: Callable = mse,
    *,
    where: str = "both",
    pattern: str = DEFAULT_FILTER,
) -> Callable:
    """``f(meta_params, task, delta, key=None) -> query loss`` after adapting on the support set,
    with ``delta`` on the selected tables during adaptation (``where`` ``"both"``/``"inner"``) and
    prediction (``"both"``/``"outer"``). With ``delta = 0`` it is the MAML-family meta-loss (the
    key is split as :mod:`metarec.meta.learners` splits it)."""
    if where not in WHERE:
        raise ValueError(f"where must be one of {', '.join(WHERE)}, got {where!r}")
    objective = make_objective(apply_fn, loss_fn)

    def f(meta_params, task, delta, key=None):
        mask = table_mask(learner.model_params(meta_params), pattern)
        k_inner, k_query = _split(key)
        inner = perturb_meta(meta_params, mask, delta) if where != "outer" else meta_params
        phi = learner.adapt(inner, task.support, k_inner)
        if where == "inner":
            phi = add_delta(phi, mask, delta, -1.0)
        elif where == "outer":
            phi = add_delta(phi, mask, delta)
        return objective(phi, task.query, k_query)

    return f


# ----------------------------------------------------------------------------------------------
# FGSM / PGD
# ----------------------------------------------------------------------------------------------
def make_attack(
    learner: MetaLearner,
    apply_fn: Callable,
    loss_fn: Callable = mse,
    *,
    method: str = "pgd",
    steps: int = 10,
    step_size: float | None = None,
    start: str = "fgsm",
    relative: bool = True,
    pattern: str = DEFAULT_FILTER,
    where: str = "both",
) -> Callable:
    """``attack(meta_params, task, eps, key=None) -> (delta, loss)``: the perturbation (a list of
    arrays shaped like the selected tables) maximising the :func:`perturbed_loss` of ONE task within
    the budget ``eps`` (see the module docstring), and that loss. ``learner`` / ``apply_fn`` must
    let gradients reach the tables (build them with ``freeze_tables=False``). ``key`` drives the
    model's stochastic parts (the same key for every evaluation, as :func:`perturbed_loss` takes
    it) and, folded, the random start (a fixed key without one).
    ``step_size`` is relative to the radius (default ``2.5 / steps``)."""
    if method not in METHODS:
        raise ValueError(f"attack method must be one of {', '.join(METHODS)}, got {method!r}")
    if start not in STARTS:
        raise ValueError(f"attack start must be one of {', '.join(STARTS)}, got {start!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"attack steps must be a positive int, got {steps!r}")
    f = perturbed_loss(learner, apply_fn, loss_fn, where=where, pattern=pattern)
    alpha = 2.5 / steps if step_size is None else float(step_size)

    def attack(meta_params, task, eps, key=None):
        mask = table_mask(learner.model_params(meta_params), pattern)
        tables = selected(learner.model_params(meta_params), mask)
        r = radii(tables, eps, relative)
        k_model = key
        k_start = jax.random.PRNGKey(0) if key is None else jax.random.fold_in(key, 1)

        def value_grad(d):
            return jax.value_and_grad(lambda d_: f(meta_params, task, d_, k_model))(d)

        zero = [jnp.zeros(t.shape, jnp.float32) for t in tables]

        def fgsm_from(g):
            return [ri * _unit_rows(gi) for gi, ri in zip(g, r)]

        if method == "fgsm":
            _, g = value_grad(zero)
            delta = fgsm_from(g)
            return delta, f(meta_params, task, delta, k_model)

        if start == "zero":
            d0 = zero
        elif start == "fgsm":
            d0 = fgsm_from(value_grad(zero)[1])
        else:
            keys = jax.random.split(k_start, 2 * len(tables))
            d0 = []
            for j, (t, ri) in enumerate(zip(tables, r)):
                z = _unit_rows(jax.random.normal(keys[2 * j], t.shape))
                u = jax.random.uniform(keys[2 * j + 1], t.shape[:1] + (1,))
                d0.append(ri * u ** (1.0 / t.shape[1]) * z)

        def body(carry, _):
            d, best, best_loss = carry
            loss, g = value_grad(d)
            better = loss > best_loss
            best = [jnp.where(better, di, bi) for di, bi in zip(d, best)]
            best_loss = jnp.where(better, loss, best_loss)
            d = project([di + alpha * ri * _unit_rows(gi) for di, gi, ri in zip(d, g, r)], r)
            return (d, best, best_loss), None

        init = (d0, d0, jnp.asarray(-jnp.inf, jnp.float32))
        (d, best, best_loss), _ = jax.lax.scan(body, init, None, length=steps)
        last = f(meta_params, task, d, k_model)
        better = last > best_loss
        best = [jnp.where(better, di, bi) for di, bi in zip(d, best)]
        return best, jnp.where(better, last, best_loss)

    return attack


def make_attacked_predict(
    learner: MetaLearner,
    apply_fn: Callable,
    attack: Callable,
    *,
    pattern: str = DEFAULT_FILTER,
    jit: bool = True,
) -> Callable:
    """``fn(meta_params, tasks, eps) -> {"pred": [T, Q], "loss": [T]}`` (vmapped over tasks): the
    attack's perturbation on the selected tables (read by adaptation and prediction), then the
    query predictions after adapting on the support set. Deterministic model (no key)."""

    def one(meta_params, task, eps):
        delta, loss = attack(meta_params, task, eps)
        delta = jax.lax.stop_gradient(delta)
        mask = table_mask(learner.model_params(meta_params), pattern)
        pmeta = perturb_meta(meta_params, mask, delta)
        phi = learner.adapt(pmeta, task.support)
        return {"pred": apply_fn(phi, task.query.x).astype(jnp.float32), "loss": loss}

    def fn(meta_params, tasks, eps):
        return jax.vmap(one, in_axes=(None, 0, None))(meta_params, tasks, eps)

    return jax.jit(fn) if jit else fn


# ----------------------------------------------------------------------------------------------
# adversarial meta-training
# ----------------------------------------------------------------------------------------------
def adversarial(
    learner: MetaLearner,
    apply_fn: Callable,
    loss_fn: Callable = mse,
    *,
    eps: float,
    lam: float = 0.5,
    method: str = "fgsm",
    steps: int = 1,
    start: str = "fgsm",
    relative: bool = True,
    pattern: str = DEFAULT_FILTER,
    where: str = "both",
    attack_learner: MetaLearner | None = None,
    attack_apply_fn: Callable | None = None,
) -> MetaLearner:
    """``learner`` trained on ``(1 - lam) x clean + lam x adversarial`` query loss.

    The clean part is ``learner.task_grad`` itself; the adversarial part is the gradient w.r.t. the
    meta-parameters of :func:`perturbed_loss` (through ``learner`` and ``apply_fn``: the model as
    trained, frozen tables included) at the perturbation found by :func:`make_attack` (through
    ``attack_learner`` / ``attack_apply_fn``, default the same), held fixed. For learners whose
    ``task_grad`` is the gradient of the query loss after adaptation (MAML, FOMAML, Meta-SGD).
    ``adapt`` / ``init`` / ``model_params`` are the base learner's: test-time adaptation is
    unchanged. ``eps == 0`` or ``lam == 0`` returns ``learner`` unchanged (exactly the base)."""
    if not 0 <= lam <= 1:
        raise ValueError(f"adversarial: lam must be in [0, 1], got {lam!r}")
    if not eps >= 0:
        raise ValueError(f"adversarial: eps must be >= 0, got {eps!r}")
    if eps == 0 or lam == 0:
        return learner
    attack = make_attack(
        attack_learner or learner,
        attack_apply_fn or apply_fn,
        loss_fn,
        method=method,
        steps=steps,
        start=start,
        relative=relative,
        pattern=pattern,
        where=where,
    )
    f = perturbed_loss(learner, apply_fn, loss_fn, where=where, pattern=pattern)

    def task_grad(meta_params, task, key=None):
        clean, g_clean = learner.task_grad(meta_params, task, key)
        delta, _ = attack(meta_params, task, eps, key)
        delta = jax.lax.stop_gradient(delta)
        adv, g_adv = jax.value_and_grad(f)(meta_params, task, delta, key)
        loss = (1.0 - lam) * clean + lam * adv
        g = jax.tree_util.tree_map(lambda a, b: (1.0 - lam) * a + lam * b, g_clean, g_adv)
        return loss, g

    return learner._replace(task_grad=task_grad, name=f"adv_{learner.name}")
