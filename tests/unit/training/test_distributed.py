"""The placement helpers of multi-process training, on this one process: a replicated round trip
keeps values, dtypes and PRNG key types; a local mesh does not span processes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metarec.meta.step import make_mesh
from metarec.training import distributed


def test_replicate_and_to_host_round_trip_keeps_values_and_key_types():
    mesh = make_mesh(1)
    tree = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "count": jnp.int32(7),
        "raw_key": jax.random.PRNGKey(3),
        "typed_key": jax.random.key(3),
    }
    placed = distributed.replicate(tree, mesh)
    assert all(a.is_fully_replicated for a in jax.tree_util.tree_leaves(placed))
    back = distributed.to_host(placed)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["count"].dtype == np.int32 and int(back["count"]) == 7
    np.testing.assert_array_equal(back["raw_key"], np.asarray(tree["raw_key"]))
    assert jnp.issubdtype(back["typed_key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(back["typed_key"]), jax.random.key_data(tree["typed_key"])
    )
    # host values pass through
    assert distributed.to_host({"x": 1.5})["x"] == 1.5


def test_a_local_mesh_does_not_span_processes():
    assert not distributed.spans_processes(None)
    assert not distributed.spans_processes(make_mesh(1))
