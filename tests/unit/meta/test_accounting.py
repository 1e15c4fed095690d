"""Privacy accounting against published values and its own limits."""

import math

import dp_accounting
import numpy as np
import pytest

from metarec.meta import accounting

# TensorFlow Privacy's MNIST tutorial table (README of tutorials/): N = 60,000, batch 256,
# delta = 1e-5, RDP with the classic conversion eps = min_a rdp(a) + log(1/delta) / (a - 1)
PUBLISHED = [(1.1, 60, 3.01), (1.3, 15, 1.19)]
TF_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, *range(5, 64), 128, 256, 512]


@pytest.mark.parametrize("sigma,epochs,published", PUBLISHED)
def test_rdp_curve_reproduces_published_epsilon(sigma, epochs, published):
    q, steps, delta = 256 / 60000, math.ceil(epochs * 60000 / 256), 1e-5
    acc = dp_accounting.rdp.RdpAccountant(orders=TF_ORDERS)
    acc.compose(accounting.dp_event(sigma, q, steps))
    # the RDP curve of the composed event (dp-accounting keeps it in `_rdp`, same order as orders)
    rdp = np.asarray(acc._rdp)
    classic = float(np.min(rdp + math.log(1 / delta) / (np.asarray(TF_ORDERS) - 1)))
    assert classic == pytest.approx(published, abs=0.005)
    # what we report uses dp-accounting's tighter conversion: never above the classic bound
    eps = accounting.epsilon(sigma, q, steps, delta)
    assert eps <= classic + 1e-9
    assert eps == pytest.approx(classic, rel=0.2)


def test_pld_and_rdp_agree_roughly_and_pld_is_tighter():
    q, steps, delta = 0.05, 500, 1e-4
    rdp = accounting.epsilon(1.0, q, steps, delta, "rdp")
    pld = accounting.epsilon(1.0, q, steps, delta, "pld")
    assert pld <= rdp
    assert pld == pytest.approx(rdp, rel=0.3)


def test_epsilon_monotone_and_limits():
    q, delta = 0.1, 1e-3
    eps = [accounting.epsilon(s, q, 200, delta) for s in (0.8, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert accounting.epsilon(1.0, q, 100, delta) < accounting.epsilon(1.0, q, 400, delta)
    assert accounting.epsilon(0.0, q, 10, delta) == math.inf
    assert accounting.epsilon(1.0, q, 0, delta) == 0.0


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0, 8.0])
def test_calibrate_noise_meets_target_tightly(target):
    q, steps, delta = 0.1, 300, 1 / 600
    sigma = accounting.calibrate_noise(target, q, steps, delta)
    assert accounting.epsilon(sigma, q, steps, delta) <= target
    # a slightly smaller noise would exceed the target: the calibration is tight
    assert accounting.epsilon(sigma * 0.97, q, steps, delta) > target
    assert accounting.calibrate_noise(math.inf, q, steps, delta) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampling_rate=0.0), "sampling_rate"),
        (dict(delta=1.0), "delta"),
        (dict(steps=-1), "steps"),
        (dict(accountant="moments"), "accountant"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=match):
        accounting.epsilon(**args)
