"""Meta-learning core: the inner loop (:func:`adapt`) and the MAML-family meta-learners.

Quick use::

    from metarec import meta
    learner = meta.maml(apply_fn, inner_steps=5, inner_lr=1e-2, adapt_mask=mask)
    meta_params = learner.init(params)
    loss, grad = learner.task_grad(meta_params, task)      # one task
    phi = learner.adapt(meta_params, task.support)          # test-time adaptation

See :mod:`metarec.meta.step` for the jitted, vmapped meta step and evaluation.
"""

from metarec.meta.inner import (
    adapt,
    listnet,
    mae,
    make_objective,
    masked_mean,
    mse,
    partition,
    path_filter,
    path_to_str,
    resolve_mask,
    with_rank_term,
)
from metarec.meta.learners import (
    MetaLearner,
    MetaSGDParams,
    cg_solve,
    fomaml,
    imaml,
    maml,
    metasgd,
    reptile,
    scale_inner_rates,
)
from metarec.meta.registry import LEARNERS, LearnerEntry, make_learner
from metarec.meta.tables import LookupTable

__all__ = [
    "adapt",
    "listnet",
    "mae",
    "make_objective",
    "masked_mean",
    "mse",
    "partition",
    "path_filter",
    "path_to_str",
    "resolve_mask",
    "with_rank_term",
    "LEARNERS",
    "LearnerEntry",
    "LookupTable",
    "MetaLearner",
    "MetaSGDParams",
    "scale_inner_rates",
    "cg_solve",
    "fomaml",
    "imaml",
    "make_learner",
    "maml",
    "metasgd",
    "reptile",
]
