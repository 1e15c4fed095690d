"""Synthetic tasks reproduce their planted ground truth."""

from __future__ import annotations

import numpy as np

from metarec import data as mdata


def test_synthetic_ground_truth():
    task, spec, truth = mdata.make_synthetic_tasks(
        seed=1, n_users=50, n_items=60, noise=0.0, scale=0.5, user_bias_std=0.1
    )
    items = task.support.x["item"][..., 1] - 1
    users = np.repeat(np.arange(50)[:, None], items.shape[1], 1)
    expect = np.clip(truth.true_mean(users, items), 1, 5)
    np.testing.assert_allclose(task.support.y, expect, rtol=1e-5)
    assert spec.item_vocab == (6, 61)
    assert task.support.x["user"][..., 0].max() < spec.user_vocab[0]
