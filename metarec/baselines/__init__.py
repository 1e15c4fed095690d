"""Non-meta baselines for the cold-start protocol.

Every baseline is a :class:`Baseline` ``(name, fit, predict)`` built by a factory taking its
hyper-parameters; :func:`make_baseline` looks factories up by their command-line name::

    from metarec.baselines import make_baseline
    b = make_baseline("user_knn", k=20)
    state = b.fit(train_user_ids, train_item_ids, train_ratings)     # numpy, training users only
    pred = b.predict(state, support_item, support_rating, support_mask,
                     query_item, query_mask, user_ids)               # [T, Q] float32

See :mod:`metarec.baselines.common` for the interface contract and each module for the
algorithm and its fallbacks for items unseen in training.
"""

from __future__ import annotations

import inspect

from metarec.baselines.common import Baseline, lookup, prepare_ratings
from metarec.baselines.knn import item_knn, user_knn
from metarec.baselines.means import global_mean, item_mean, user_mean
from metarec.baselines.mf import mf, mf_fold_in, train_mf

BASELINES = {
    "global_mean": global_mean,
    "user_mean": user_mean,
    "item_mean": item_mean,
    "mf": mf,
    "user_knn": user_knn,
    "item_knn": item_knn,
}


def make_baseline(name: str, **kwargs) -> Baseline:
    """Build the baseline called ``name`` with hyper-parameters ``kwargs``.

    Raises ``ValueError`` listing the valid names for an unknown name, and the allowed
    hyper-parameters for an unknown keyword.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; valid names: {', '.join(BASELINES)}")
    factory = BASELINES[name]
    allowed = list(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"baseline {name!r} has no hyper-parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )
    return factory(**kwargs)


__all__ = [
    "BASELINES",
    "Baseline",
    "global_mean",
    "item_knn",
    "item_mean",
    "lookup",
    "make_baseline",
    "mf",
    "mf_fold_in",
    "prepare_ratings",
    "train_mf",
    "user_knn",
    "user_mean",
]
