"""The LEARNERS registry: every meta-learner by name, with the rules that belong to its algorithm.

Adding a meta-learner is one module with its factory (returning a
:class:`~metarec.meta.learners.MetaLearner`) plus one :class:`LearnerEntry` here; experiments then
accept its name (``--config.algos=...``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from metarec.meta.inner import MaskLike, mse
from metarec.meta.learners import MetaLearner, fomaml, imaml, maml, metasgd, reptile


@dataclasses.dataclass(frozen=True)
class LearnerEntry:
    """A registered meta-learner: its factory and the rules that belong to the algorithm.

    ``adapts_all``: the algorithm must adapt every parameter whatever mask the caller asks for
    (Reptile's meta-gradient θ − φ is zero on leaves the inner loop does not adapt, so a partial
    mask would leave them untrained). ``options``: algorithm-only hyper-parameters with their
    defaults (iMAML's proximal strength ``lam`` and conjugate-gradient steps; a separate outer
    loss ``query_loss_fn`` for the learners that differentiate a query loss through the inner
    loop); ``remat``: the factory takes the ``remat`` option of the shared inner loop.
    """

    factory: Callable[..., MetaLearner]
    adapts_all: bool = False
    options: dict = dataclasses.field(default_factory=dict)
    remat: bool = True


LEARNERS = {
    "maml": LearnerEntry(maml, options={"newton": 0.0, "query_loss_fn": None}),
    "fomaml": LearnerEntry(fomaml, options={"newton": 0.0, "query_loss_fn": None}),
    "reptile": LearnerEntry(reptile, adapts_all=True),
    "metasgd": LearnerEntry(metasgd, options={"newton": 0.0, "query_loss_fn": None}),
    "imaml": LearnerEntry(imaml, options={"lam": 1.0, "cg_steps": 5}, remat=False),
}


def make_learner(
    name: str,
    apply_fn: Callable,
    loss_fn: Callable = mse,
    *,
    inner_steps: int = 5,
    inner_lr=1e-2,
    adapt_mask: MaskLike = None,
    remat: bool = False,
    **options,
) -> MetaLearner:
    """Build the registered learner ``name`` with the common settings and the algorithm's own rules
    (:class:`LearnerEntry`): a learner that adapts everything ignores ``adapt_mask``; ``options``
    override the algorithm's own hyper-parameters. Unknown names or options raise ``ValueError``
    listing what is allowed."""
    if name not in LEARNERS:
        raise ValueError(f"unknown meta-learner {name!r}; allowed: {', '.join(LEARNERS)}")
    entry = LEARNERS[name]
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise ValueError(
            f"meta-learner {name!r} has no option(s) {', '.join(unknown)}; allowed: {allowed}"
        )
    kwargs = dict(
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        adapt_mask=None if entry.adapts_all else adapt_mask,
    )
    if entry.remat:
        kwargs["remat"] = remat
    return entry.factory(apply_fn, loss_fn, **kwargs, **(entry.options | options))
