"""The private training loop: epsilon of exactly the steps taken, Poisson batches, and a run
interrupted mid-way and resumed from its checkpoint ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest

from metarec import meta
from metarec.meta import accounting
from metarec.meta.private import make_dp_meta_step
from metarec.meta.step import make_eval_fn
from metarec.training.checkpoint import Checkpointer
from metarec.training.private_train import PrivacySettings, private_train
from tests.unit.meta.test_meta import MLP_MASK, make_tasks, mlp_init, noisy_apply

LEARNER = meta.metasgd(noisy_apply, inner_steps=1, inner_lr=0.1, adapt_mask=MLP_MASK)
OPT = optax.adam(1e-2)
SETTINGS = PrivacySettings(
    l2_clip=0.5, noise_multiplier=1.2, sampling_rate=0.25, steps=6, delta=1 / 24
)
STEP = make_dp_meta_step(
    LEARNER, OPT, l2_clip=0.5, noise_multiplier=1.2, expected_batch_size=6.0, chunk_size=4
)
EVAL = make_eval_fn(LEARNER, noisy_apply)
POOL = make_tasks(1, 24)
VAL = make_tasks(2, 5)


def _train(pool=POOL, **kw):
    return private_train(
        STEP,
        OPT,
        EVAL,
        LEARNER,
        mlp_init(jax.random.key(0)),
        pool,
        VAL,
        SETTINGS,
        jax.random.PRNGKey(1),
        (-10.0, 10.0),
        chunk_size=4,
        eval_every=3,
        **kw,
    )


def test_result_reports_the_accounted_epsilon_and_batches():
    res = _train()
    assert res.steps == 6 and res.n_users == 24
    assert res.epsilon == accounting.epsilon(1.2, 0.25, 6, 1 / 24)
    assert res.capacity % 4 == 0 and res.capacity >= 6 + 5 * math.sqrt(6 * 0.75) - 4
    assert res.truncated == 0 and 0 < res.mean_sampled < res.capacity
    assert [h["step"] for h in res.history] == [3, 6]
    assert res.final_val_mae == res.history[-1]["val_mae"]
    again = _train()
    assert again.params_sha256 == res.params_sha256  # seeded


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_is_bit_identical(tmp_path):
    ref = _train()
    calls = {"n": 0}

    def flaky_pool(step):
        calls["n"] += 1
        if step == 5 and calls["n"] < 10:  # dies inside the piece after the step-4 checkpoint
            raise Interrupt
        return POOL

    with Checkpointer(str(tmp_path / "ck"), keep_last=2) as ck:
        with pytest.raises(Interrupt):
            _train(flaky_pool, checkpointer=ck, ckpt_every=2)
        assert ck.latest_step() == 4
    calls["n"] = 100
    with Checkpointer(str(tmp_path / "ck"), keep_last=2) as ck:
        res = _train(flaky_pool, checkpointer=ck, ckpt_every=2, resume=True)
    assert res.resumed_from == 4
    assert res.params_sha256 == ref.params_sha256
    assert res.history == [{**h, "seconds": r["seconds"]} for h, r in zip(ref.history, res.history)]
    np.testing.assert_equal(res.mean_sampled, ref.mean_sampled)
