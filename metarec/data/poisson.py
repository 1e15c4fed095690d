"""Poisson sampling of users with static shapes, for differentially private meta-training.

The privacy accounting of DP-SGD (:mod:`metarec.meta.accounting`) assumes that every step includes
every user independently with probability ``q``, so the batch size is random. A jitted step needs
one shape: the sampled users' indices are padded to a fixed ``capacity`` (weights 1 for sampled
users, 0 for padding). :func:`poisson_capacity` puts the capacity ``n_std`` standard deviations
above the expected count, so a draw with more users than slots is astronomically rare; when one
happens, a uniformly random subset of ``capacity`` sampled users is kept and the draw reports how
many were left out (``truncated``), never silently. Host-side numpy; a draw depends only on the
generator passed in (seed it by ``(seed, step)`` for resumable, reproducible training).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PoissonDraw:
    """One step's sample: ``indices [capacity]`` (sampled users first, in increasing order, then
    padding index 0), ``weights [capacity]`` (1.0 sampled, 0.0 padding), ``n_sampled`` (users the
    coin flips included) and ``truncated`` (of those, how many did not fit the capacity)."""

    indices: np.ndarray
    weights: np.ndarray
    n_sampled: int
    truncated: int


def poisson_capacity(n_users: int, rate: float, n_std: float = 5.0, multiple: int = 1) -> int:
    """Slots for a Poisson sample of ``n_users`` users at inclusion probability ``rate``: the
    expected count plus ``n_std`` binomial standard deviations, rounded up to ``multiple`` (e.g. the
    meta-step's chunk size), at most ``n_users`` rounded up likewise."""
    if n_users < 1 or not 0 < rate <= 1 or n_std < 0 or multiple < 1:
        raise ValueError(
            f"need n_users >= 1, 0 < rate <= 1, n_std >= 0, multiple >= 1; got {n_users}, {rate}, "
            f"{n_std}, {multiple}"
        )
    mean = n_users * rate
    cap = min(n_users, math.ceil(mean + n_std * math.sqrt(mean * (1 - rate))))
    return max(multiple, -(-cap // multiple) * multiple)


def poisson_sample(
    rng: np.random.Generator, n_users: int, rate: float, capacity: int
) -> PoissonDraw:
    """Include each of ``n_users`` users independently with probability ``rate``; pad (or, rarely,
    truncate: see the module docstring) to ``capacity`` slots."""
    if capacity < 1 or not 0 < rate <= 1:
        raise ValueError(f"need capacity >= 1 and 0 < rate <= 1, got {capacity}, {rate}")
    picked = np.flatnonzero(rng.random(n_users) < rate)
    n = len(picked)
    truncated = max(0, n - capacity)
    if truncated:
        picked = np.sort(rng.choice(picked, capacity, replace=False))
    indices = np.zeros(capacity, np.int64)
    weights = np.zeros(capacity, np.float32)
    indices[: len(picked)] = picked
    weights[: len(picked)] = 1.0
    return PoissonDraw(indices, weights, int(n), int(truncated))
