"""Privacy accounting for the Poisson-sampled Gaussian mechanism (DP-SGD / DP-FedAvg), with
Google's ``dp-accounting`` rather than hand-written formulas.

One private step samples every unit (a user, or a client in DP-FedAvg) independently with
probability ``q``, clips each sampled unit's contribution to L2 norm ``C`` and adds
``N(0, (sigma C)^2)`` noise to their sum. ``steps`` such steps are accounted as a self-composition
of ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; ``epsilon`` reports the smallest epsilon
at ``delta`` and ``calibrate_noise`` the smallest ``sigma`` that stays within a target epsilon.
Pure host-side code: nothing here runs under ``jit``.
"""

from __future__ import annotations

import math

import dp_accounting

ACCOUNTANTS = ("rdp", "pld")
# PLD discretisation: finer is tighter and slower; 1e-4 keeps one calibration under seconds
_PLD_DISCRETIZATION = 1e-4


def _check(sampling_rate: float, steps: int, delta: float, accountant: str) -> None:
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _accountant(name: str):
    if name == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int):
    """The ``dp_accounting`` event of ``steps`` Poisson-sampled Gaussian steps."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        steps,
    )


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon at ``delta`` after ``steps`` steps; ``inf`` without noise, ``0`` without steps."""
    _check(sampling_rate, steps, delta, accountant)
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = _accountant(accountant)
    acc.compose(dp_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


def calibrate_noise(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    *,
    tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (to ``tol``) whose :func:`epsilon` is at most
    ``target_epsilon``; ``0`` for ``target_epsilon = inf`` (no privacy)."""
    _check(sampling_rate, steps, delta, accountant)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0 (inf: no privacy), got {target_epsilon}")
    if math.isinf(target_epsilon) or steps == 0:
        return 0.0
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            lambda sigma: dp_event(sigma, sampling_rate, steps),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e3),
            tol=tol,
        )
    )
