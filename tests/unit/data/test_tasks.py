"""Fixed-shape task batches: through jit and vmap, padding, meta-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec import data as mdata
from metarec.data.scenarios import make_split


def test_task_batch_through_jit_and_vmap(scenario_data):
    split = make_split(scenario_data, seed=0)
    enc = mdata.FeatureEncoder.fit(scenario_data, split.train_ratings)
    tasks = mdata.tasks.to_device(enc.encode(split.sets["warm_train"]))
    same = jax.jit(lambda t: t)(tasks)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tasks, same)

    def masked_mean(task):
        return jnp.sum(task.support.y * task.support.mask) / jnp.sum(task.support.mask)

    by_vmap = jax.jit(jax.vmap(masked_mean))(tasks)
    by_loop = [masked_mean(mdata.index_tasks(tasks, i)) for i in range(tasks.num_tasks)]
    np.testing.assert_allclose(by_vmap, by_loop, rtol=1e-6)


def test_pad_and_meta_batches():
    task, _, _ = mdata.make_synthetic_tasks(seed=0, n_users=10, n_items=40, n_support=5, n_query=3)
    padded, w = mdata.pad_tasks(task, 4)
    assert padded.num_tasks == 12 and w.tolist() == [1.0] * 10 + [0.0] * 2
    assert padded.support.mask[10:].sum() == 0 and np.all(padded.user[10:] == -1)
    batches = list(mdata.iterate_meta_batches(task, 4, np.random.default_rng(0)))
    assert len(batches) == 2 and all(b.num_tasks == 4 for b in batches)
    seen = np.concatenate([b.user for b in batches])
    assert len(set(seen.tolist())) == 8
    again = list(mdata.iterate_meta_batches(task, 4, np.random.default_rng(0)))
    np.testing.assert_array_equal(seen, np.concatenate([b.user for b in again]))
    with pytest.raises(ValueError, match="larger than the number of training tasks"):
        list(mdata.iterate_meta_batches(task, 11, np.random.default_rng(0)))
