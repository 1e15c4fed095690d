"""Calibration of Meta-SGD's learned inner rates on validation users: the scale with the lowest
MAE - nDCG@k wins (hand-made predictions whose error is known for every scale), ties go to the
scale nearest 1, an undefined objective never wins, other learners pass through, and bad scales
are refused naming the config field; with a new-item scale, new items are predicted with
their own meta-parameters and the calibration chooses the known items' scale."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from metarec.data.encode import new_item_mask
from metarec.data.tasks import Examples, Task
from metarec.meta import MetaSGDParams, scale_inner_rates
from metarec.training.meta_train import (
    calibrate_inner_rates,
    check_step_scales,
    new_item_params,
    predict_tasks,
)

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


# new items: query examples whose item id (x["item"][..., 1]) is out of vocabulary (0)
ITEMS = np.stack([np.full((2, 4), 7), np.array([[3, 0, 5, 0], [0, 0, 2, 9]])], axis=-1)
NEW = ITEMS[..., 1] == 0
TASKS_ITEMS = Task(
    support=Examples(x={"item": ITEMS}, y=Y, mask=np.ones_like(Y)),
    query=Examples(x={"item": ITEMS}, y=Y, mask=np.ones_like(Y)),
    user=np.arange(2, dtype=np.int32),
)


def _rate_fn(meta, batch):
    """Every prediction is the mean learned rate: which meta-parameters predicted it."""
    return {"pred": jnp.zeros_like(batch.query.y) + jnp.mean(meta.lr["w"])}


def test_new_items_are_predicted_with_their_own_parameters():
    np.testing.assert_array_equal(new_item_mask(TASKS_ITEMS.query.x), NEW)
    new = new_item_params(META, 0.25)
    np.testing.assert_allclose(new.lr["w"], np.full(3, 0.5))
    out = predict_tasks(_rate_fn, META, TASKS_ITEMS, 8, new)["pred"]
    np.testing.assert_allclose(out, np.where(NEW, 0.5, 2.0))
    # without new-item parameters every example is predicted as before
    np.testing.assert_allclose(predict_tasks(_rate_fn, META, TASKS_ITEMS, 8)["pred"], 2.0)
    # -1 (one scale for every item), no scale, or a learner without learned rates: none
    assert new_item_params(META, -1.0) is None and new_item_params(META, None) is None
    assert new_item_params({"w": jnp.zeros(3)}, 0.5) is None


def test_calibration_with_a_new_item_scale_chooses_the_known_items_scale():
    # known items' error |rate - 1| / 4 wants the scale 0.5; new items are predicted at the
    # fixed scale 0 (rate 0, error 1/4) whatever the candidate, so they add a constant error
    def fn(meta, batch):
        off = jnp.abs(jnp.mean(meta.lr["w"]) - 1.0) / 4
        return {"pred": batch.query.y + off * jnp.where(batch.query.y > 3, -1.0, 1.0)}

    params, s, table = calibrate_inner_rates(
        fn, META, TASKS_ITEMS, (0.0, 0.5, 1.0), (1.0, 5.0), 2, 8, new_scale=0.0
    )
    assert s == 0.5
    np.testing.assert_allclose(params.lr["w"], np.ones(3))
    share = NEW.mean(axis=1)  # per user, the share of query examples that are new (error 1/4)
    assert table[0.5]["mae"] == pytest.approx(np.mean(share / 4))
    assert table[1.0]["mae"] == pytest.approx(np.mean(share / 4 + (1 - share) / 4))
