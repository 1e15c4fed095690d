"""The RL training loops in resumable pieces on the one trainer: one piece == many pieces == pieces
after a crash and resume, a non-finite metric that keeps the last good checkpoint, foreign
checkpoints refused, and (slow) every trained method cut into pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarec.rl import loop
from metarec.training.checkpoint import Checkpointer, tree_digest
from metarec.training.trainer import NonFiniteLossError


def _toy_trainer(n=12):
    """Noisy SGD on a quadratic: params, Adam state and a PRNG key, like the RL trainers."""
    tx = optax.adam(0.1)

    def init(key):
        k_init, k_loop = jax.random.split(key)
        w = jax.random.normal(k_init, (3,))
        return {"params": w, "opt_state": tx.init(w), "key": k_loop}

    def run(state, env_params, start, length):
        def body(carry, k):
            w, s = carry
            loss, g = jax.value_and_grad(lambda w: jnp.sum((w - env_params) ** 2))(w)
            u, s = tx.update(g + 0.1 * jax.random.normal(k, w.shape), s)
            return (optax.apply_updates(w, u), s), {"loss": loss}

        keys = loop.iteration_keys(state["key"], n, start, length)
        (w, s), m = jax.lax.scan(body, (state["params"], state["opt_state"]), keys)
        return {**state, "params": w, "opt_state": s}, m

    return loop.Trainer(init, run, n)


class _Crash(Exception):
    pass


def test_loop_in_pieces_with_crash_and_resume_equals_one_piece(tmp_path):
    t = _toy_trainer()
    target = jnp.array([1.0, -2.0, 0.5])
    run = jax.jit(t.run, static_argnames="length")

    def init():
        return t.init(jax.random.PRNGKey(0))

    one, m_one = run(init(), target, 0, t.num_iterations)

    def crash_at(n):
        def on_chunk(start, m):
            if start >= n:
                raise _Crash(start)

        return on_chunk

    def train(ck, **kw):
        return loop.train_checkpointed(
            run, init, target, t.num_iterations, every=5, checkpointer=ck, **kw
        )

    d = str(tmp_path / "ck")
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        with pytest.raises(_Crash):
            train(ck, on_chunk=crash_at(5), meta={"unit": "toy"})
        assert ck.all_steps() == [5]
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        seen = []
        out = train(
            ck,
            resume=True,
            on_chunk=lambda s, m: seen.append((s, len(m["loss"]))),
            meta={"unit": "toy"},
        )
        assert ck.all_steps() == [10, 12] and ck.restore_meta(12)["done"]
    assert out.resumed_from == 5 and seen == [(5, 5), (10, 2)]
    # pieces of 5, 5 (after a crash), 2 == one piece of 12
    assert tree_digest(out.state) == tree_digest(one)
    np.testing.assert_array_equal(out.metrics["loss"], np.asarray(m_one["loss"]))
    # a finished loop trains nothing and, with need_state=False, restores no arrays
    with Checkpointer(d, keep_last=2, keep_best=0) as ck:
        again = train(ck, resume=True, on_chunk=crash_at(0), need_state=False, meta={"unit": "toy"})
        assert again.state is None and again.resumed_from == 12
        np.testing.assert_array_equal(again.metrics["loss"], out.metrics["loss"])
        with pytest.raises(ValueError, match="written for another run"):
            train(ck, resume=True, meta={"unit": "other"})
        with pytest.raises(ValueError, match=r"written for another run \(num_iterations: 12 -> 7"):
            loop.train_checkpointed(
                run, init, target, 7, checkpointer=ck, resume=True, meta={"unit": "toy"}
            )


def test_loop_non_finite_stops_naming_iteration_and_keeps_last_good(tmp_path):
    t = _toy_trainer()
    real = jax.jit(t.run, static_argnames="length")

    def poisoned(state, env_params, start, length):  # the real piece, but iteration 7 reports NaN
        st, m = real(state, env_params, start, length)
        if start <= 6 < start + length:
            m = {"loss": m["loss"].at[6 - start].set(jnp.nan)}
        return st, m

    def init():
        return t.init(jax.random.PRNGKey(0))

    with Checkpointer(str(tmp_path / "ck"), keep_last=3, keep_best=0) as ck:
        with pytest.raises(NonFiniteLossError) as e:
            loop.train_checkpointed(
                poisoned,
                init,
                jnp.zeros(3),
                t.num_iterations,
                every=3,
                checkpointer=ck,
                name="seed 4, method toy",
            )
        assert ck.all_steps() == [3, 6]  # the piece with the NaN (iterations 7-9) was not saved
    msg = str(e.value)
    assert msg.startswith("seed 4, method toy: non-finite training loss (nan) at iteration 7 of 12")
    assert "last good checkpoint (iteration 6)" in msg and "--resume" in msg
    assert str(tmp_path / "ck") in msg
    assert (e.value.iteration, e.value.last_good_step) == (7, 6)
    with pytest.raises(NonFiniteLossError, match="no checkpoints were written"):
        loop.train_checkpointed(poisoned, init, jnp.zeros(3), t.num_iterations, every=12)


@pytest.mark.slow  # ~1-2 min on 2 cores (compiling PPO, DQN and Meta-SGD twice)
# bit for bit on the programs users run: with other fusions a scan of 7 and pieces of 3, 3, 1 round
# differently
def test_every_trainer_in_pieces_equals_one_piece(xla_optimized):
    from metarec.rl import dqn, maml, networks, ppo
    from metarec.rl import env as E
    from metarec.rl import simulator as S

    cfg = E.EnvConfig(horizon=4, history_len=2)
    sim = S.synthetic_simulator(0, 16, 4, 10, env_config=cfg, mf_steps=10)
    net = networks.make_item_scorer(10, 2, 8, 16)
    dqn_cfg = dqn.DQNConfig(num_iterations=7, num_envs=2, buffer_size=64, batch_size=8)
    meta_cfg = maml.MetaRLConfig(
        num_iterations=7, meta_batch=2, inner_steps=1, query_episodes=2, meta_sgd=True
    )
    trainers = {
        "ppo": ppo.make_trainer(ppo.PPOConfig(num_updates=7, num_envs=4), net),
        "dqn": dqn.make_trainer(dqn_cfg, net),
        "metasgd": maml.make_meta_trainer(meta_cfg, net),
    }
    for name, t in trainers.items():
        init = jax.jit(t.init)
        run = jax.jit(t.run, static_argnames="length")
        one, m_one = run(init(jax.random.PRNGKey(1), sim.train), sim.train, 0, 7)

        def fresh(init=init):
            return init(jax.random.PRNGKey(1), sim.train)

        out = loop.train_checkpointed(run, fresh, sim.train, 7, every=3)
        assert tree_digest(out.state) == tree_digest(one), name
        for k, v in m_one.items():
            np.testing.assert_array_equal(out.metrics[k], np.asarray(v), err_msg=f"{name}/{k}")
