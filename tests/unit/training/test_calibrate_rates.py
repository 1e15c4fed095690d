"""Calibration of Meta-SGD's learned inner rates on validation users: the scale with the lowest
MAE - nDCG@k wins (hand-made predictions whose error is known for every scale), ties go to the
scale nearest 1, an undefined objective never wins, other learners pass through, and bad scales
are refused naming the config field."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from metarec.data.tasks import Examples, Task
from metarec.meta import MetaSGDParams, scale_inner_rates
from metarec.training.meta_train import calibrate_inner_rates, check_step_scales

Y = np.array([[4.0, 2.0, 5.0, 1.0], [3.0, 5.0, 2.0, 4.0]], np.float32)
TASKS = Task(
    support=Examples(x={}, y=Y, mask=np.ones_like(Y)),
    query=Examples(x={}, y=Y, mask=np.ones_like(Y)),
    user=np.arange(2, dtype=np.int32),
)
META = MetaSGDParams(params={"w": jnp.zeros(3)}, lr={"w": jnp.full(3, 2.0)})


def _eval_fn(offset_of_rate):
    """Predictions = the true query ratings + ``offset_of_rate(mean learned rate)``: the ranking
    never changes (nDCG 1), the MAE is the offset's absolute value (no clipping inside 1..5)."""

    def eval_fn(meta, batch):
        off = offset_of_rate(jnp.mean(meta.lr["w"]))
        return {"pred": batch.query.y + off * jnp.where(batch.query.y > 3, -1.0, 1.0)}

    return eval_fn


def test_scale_inner_rates_scales_rates_only():
    out = scale_inner_rates(META, 0.25)
    np.testing.assert_array_equal(out.lr["w"], np.full(3, 0.5))
    assert out.params["w"] is META.params["w"]
    with pytest.raises(TypeError, match="MetaSGDParams"):
        scale_inner_rates({"w": jnp.zeros(3)}, 0.5)


def test_calibration_picks_the_scale_with_the_lowest_error():
    # error |rate - 1|: the learned rate 2.0 wants the scale 0.5
    fn = _eval_fn(lambda r: jnp.abs(r - 1.0) / 4)
    params, s, table = calibrate_inner_rates(fn, META, TASKS, (0.0, 0.5, 1.0), (1.0, 5.0), 2, 8)
    assert s == 0.5
    np.testing.assert_allclose(params.lr["w"], np.ones(3))
    assert set(table) == {0.0, 0.5, 1.0}
    assert table[0.5]["mae"] == pytest.approx(0.0, abs=1e-6)
    assert table[1.0]["mae"] == pytest.approx(0.25)
    assert table[0.0]["mae"] == pytest.approx(0.25)
    assert table[1.0]["ndcg@2"] == pytest.approx(1.0)
    assert table[1.0]["objective"] == pytest.approx(0.25 - 1.0)


def test_ties_go_to_the_scale_nearest_one_and_nan_never_wins():
    fn = _eval_fn(lambda r: 0.0 * r + 0.1)  # every scale scores the same
    _, s, _ = calibrate_inner_rates(fn, META, TASKS, (0.0, 0.25, 0.75, 1.25), (1.0, 5.0), 2, 8)
    assert s == 0.75
    nan_below_one = _eval_fn(lambda r: jnp.where(r < 1.9, jnp.nan, 0.3))
    _, s, table = calibrate_inner_rates(nan_below_one, META, TASKS, (0.5, 1.0), (1.0, 5.0), 2, 8)
    assert np.isnan(table[0.5]["objective"]) and s == 1.0


def test_other_learners_and_empty_scales_pass_through():
    plain = {"w": jnp.zeros(3)}
    fn = _eval_fn(lambda r: 0.0)
    out = calibrate_inner_rates(fn, plain, TASKS, (0.5, 1.0), (1.0, 5.0), 2, 8)
    assert out == (plain, None, {})
    assert calibrate_inner_rates(fn, META, TASKS, (), (1.0, 5.0), 2, 8) == (META, None, {})


@pytest.mark.parametrize("bad", [(-0.5, 1.0), ("x",), 3.0])
def test_bad_scales_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="--config.step_scales"):
        check_step_scales(bad)
