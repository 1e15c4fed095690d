"""Checkpoints: orbax round trip (NamedTuple params/opt state, PRNG keys), one saved array per
dtype, retention of the last N + best, the resumable sampler, clear errors for a wrong structure,
an older layout or a missing step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from metarec.meta import MetaSGDParams
from metarec.training import checkpoint as ckpt


# ---------------------------------------------------------------- pieces
def test_epoch_order_depends_only_on_seed_and_epoch():
    a = ckpt.epoch_order(7, 3, 50)
    np.testing.assert_array_equal(a, ckpt.epoch_order(7, 3, 50))
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, ckpt.epoch_order(7, 4, 50))
    assert not np.array_equal(a, ckpt.epoch_order(8, 3, 50))


def test_tree_digest_sees_one_bit():
    t = {"a": jnp.arange(4.0), "b": (jnp.ones((2, 2), jnp.int32),)}
    d = ckpt.tree_digest(t)
    assert d == ckpt.tree_digest(jax.tree_util.tree_map(lambda x: x + 0, t))
    flipped = np.asarray(t["a"]).copy().view(np.uint32)
    flipped[2] ^= 1
    assert ckpt.tree_digest({"a": flipped.view(np.float32), "b": t["b"]}) != d
    assert ckpt.tree_digest({"a": t["a"].astype(jnp.float16), "b": t["b"]}) != d  # dtype counts


def _state(seed):
    k = jax.random.PRNGKey(seed)
    params = MetaSGDParams(
        {"w": jax.random.normal(k, (3, 2)), "b": jnp.zeros(2)},
        {"w": jnp.full((3, 2), 0.1), "b": jnp.ones(2)},
    )
    opt_state = optax.adamw(1e-2, weight_decay=1e-4).init(params)
    return {"params": params, "opt_state": opt_state, "key": jax.random.split(k)[0]}


def test_checkpointer_round_trip_and_retention(tmp_path):
    with ckpt.Checkpointer(str(tmp_path / "c"), keep_last=2, keep_best=1) as ck:
        assert ck.latest_step() is None and ck.best_step() is None
        metrics = {1: None, 2: 0.9, 3: 0.7, 4: None, 5: 0.7, 6: 0.8, 7: None}
        for step, m in metrics.items():
            ck.save(step, _state(step), {"epoch": step, "losses": [0.1, 1 / 3]}, metric=m)
        # newest two (6, 7) + best by metric (0.7 at steps 3 and 5: the earlier wins)
        assert ck.all_steps() == [3, 6, 7]
        assert ck.latest_step() == 7 and ck.best_step() == 3
        like = _state(0)
        st, meta = ck.restore(3, like)
        assert meta["epoch"] == 3 and meta["losses"] == [0.1, 1 / 3] and meta["metric"] == 0.7
        assert isinstance(st["params"], MetaSGDParams)
        assert type(st["opt_state"][0]) is type(like["opt_state"][0])
        assert ckpt.tree_digest(st) == ckpt.tree_digest(_state(3))
        with pytest.raises(
            FileNotFoundError, match=r"no checkpoint for step 4; available: \[3, 6, 7\]"
        ):
            ck.restore(4, like)
    # reopening finds the same steps; params of the best checkpoint for research use
    p = ckpt.restore_latest_params(str(tmp_path / "c"), _state(0)["params"])
    assert ckpt.tree_digest(p) == ckpt.tree_digest(_state(3)["params"])


def test_typed_prng_key_round_trip(tmp_path):
    state = {"w": jnp.ones(3), "key": jax.random.key(5)}
    with ckpt.Checkpointer(str(tmp_path / "k")) as ck:
        ck.save(1, state, {})
        st, _ = ck.restore(1, {"w": jnp.zeros(3), "key": jax.random.key(0)})
    np.testing.assert_array_equal(jax.random.key_data(st["key"]), jax.random.key_data(state["key"]))
    np.testing.assert_array_equal(
        jax.random.uniform(st["key"], (3,)), jax.random.uniform(state["key"], (3,))
    )


def test_restore_into_wrong_structure_is_a_clear_error(tmp_path):
    with ckpt.Checkpointer(str(tmp_path / "x")) as ck:
        ck.save(1, {"params": {"w": jnp.ones(3)}}, {})
        with pytest.raises(ValueError, match="does not match the model being trained"):
            ck.restore(1, {"params": {"w": jnp.ones(3), "v": jnp.ones(2)}})


def test_state_is_saved_as_one_array_per_dtype(tmp_path):
    state = _state(1)
    with ckpt.Checkpointer(str(tmp_path / "p")) as ck:
        ck.save(1, state, {})
        saved = ck._manager.item_metadata(1).state.tree
        st, meta = ck.restore(1, _state(0))
    n = {d: sum(x.size for x in jax.tree_util.tree_leaves(state) if x.dtype == d) for d in saved}
    assert sorted(saved) == ["float32", "int32", "uint32"]  # values, adam's count, the key
    assert all(saved[d].shape == (n[d],) for d in saved)
    assert ckpt.tree_digest(st) == ckpt.tree_digest(state) and "layout" not in meta


def test_a_template_of_other_shapes_with_the_same_sizes_is_refused(tmp_path):
    with ckpt.Checkpointer(str(tmp_path / "s")) as ck:
        ck.save(1, {"w": jnp.arange(6.0).reshape(3, 2)}, {})
        with pytest.raises(ValueError, match=r"saved \['w'\] float32\(3, 2\), expected"):
            ck.restore(1, {"w": jnp.zeros((2, 3))})
        with pytest.raises(ValueError, match=r"saved \['w'\] float32\(3, 2\), expected"):
            ck.restore(1, {"w": jnp.zeros((3, 2), jnp.int32)})


def test_a_checkpoint_of_the_older_layout_is_one_clear_error(tmp_path):
    # as metarec wrote them before packing: one saved array per leaf, no layout in meta
    state = {"w": jnp.ones(3)}
    with ocp.CheckpointManager(str(tmp_path / "o"), item_names=("state", "meta")) as m:
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave({"step": 1})}
        m.save(1, args=ocp.args.Composite(**args))
        m.wait_until_finished()
    with ckpt.Checkpointer(str(tmp_path / "o")) as ck:
        for read in (lambda: ck.restore(1, state), lambda: ck.restore_meta(1)):
            with pytest.raises(ValueError, match="written by an older metarec"):
                read()
