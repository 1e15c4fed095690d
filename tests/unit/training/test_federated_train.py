"""Federated rounds on the trainer (metarec.training.federated_train): client sampling and task
slots, communication accounting, and a run killed mid-way and resumed ends bit-identical."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from metarec import meta
from metarec.meta.federated import make_round, message_bytes
from metarec.meta.step import make_eval_fn
from metarec.training import checkpoint as ckpt
from metarec.training.federated_train import (
    FedSchedule,
    client_slots,
    federated_train,
    sample_round,
)
from tests.unit.meta.test_meta import make_tasks, mlp_apply, mlp_init

MASK = {"l1": {"w": False, "b": False}, "l2": {"w": True, "b": True}}


def test_sample_round_and_slots():
    s = FedSchedule(participation=0.25, local_steps=2, client_batch=3)
    rng = np.random.default_rng(0)
    clients, part, steps = sample_round(rng, 20, s)
    assert clients.size == 5 and np.unique(clients).size == 5 and np.all(part == 1)
    assert np.all(steps == 2)
    rows_of = [np.arange(10 * c, 10 * c + (c % 4) + 3) for c in range(20)]
    rows, w = client_slots(rng, rows_of, clients, s)
    assert rows.shape == w.shape == (5, 2, 3)
    for i, c in enumerate(clients):
        real = rows[i][w[i] > 0]
        assert real.size == min(6, rows_of[c].size) and np.unique(real).size == real.size
        assert set(real.tolist()) <= set(rows_of[c].tolist())
    p = FedSchedule(participation=0.5, sampling="poisson", drop_prob=0.3, straggler_prob=1.0)
    clients, part, steps = sample_round(np.random.default_rng(1), 40, p)
    assert clients.size == 40 and np.all(part[clients < 0] == 0) and np.all(steps == 0)
    with pytest.raises(ValueError, match="participation must be in"):
        FedSchedule(participation=0.0)


@pytest.fixture(scope="module")
def setup():
    lrn = meta.make_learner("metasgd", mlp_apply, inner_steps=1, inner_lr=0.1, adapt_mask=MASK)
    opt = optax.adam(1e-2)
    meta0 = lrn.init(mlp_init(jax.random.PRNGKey(0)))
    rnd = make_round(lrn, opt, local_lr=0.1)
    ev = make_eval_fn(lrn, mlp_apply)
    val = make_tasks(99, 6)
    partition = [np.arange(c * 4, c * 4 + 4) for c in range(6)]  # 24 users, 6 clients
    return rnd, ev, meta0, opt.init(meta0), val, partition


def run(setup, tasks_of, ck=None, resume=False, rounds=6):
    rnd, ev, meta0, opt0, val, partition = setup
    s = FedSchedule(rounds=rounds, participation=0.5, local_steps=2, client_batch=2, eval_every=2)
    return federated_train(
        rnd,
        ev,
        meta0,
        opt0,
        tasks_of,
        partition,
        val,
        s,
        jax.random.PRNGKey(1),
        (-10.0, 10.0),
        use_keys=False,
        checkpointer=ck,
        resume=resume,
    )


def draw(r):
    return make_tasks(100 + r, 24)


def test_bytes_and_history(setup):
    res = run(setup, draw)
    msg = message_bytes(setup[2])
    assert res.message_bytes == msg
    assert res.bytes_down == res.bytes_up == 6 * 3 * msg  # 3 of 6 clients, all respond
    assert [h["round"] for h in res.history] == [2, 4, 6]
    assert res.history[0]["bytes_up"] == 2 * 3 * msg
    assert res.best_val_mae == min(h["val_mae"] for h in res.history)


def test_killed_run_resumes_bit_identical(setup, tmp_path):
    full = run(setup, draw)

    class Crash(Exception):
        pass

    def crashing(r):
        if r == 4:
            raise Crash()
        return draw(r)

    with ckpt.Checkpointer(str(tmp_path / "c"), keep_last=2, keep_best=1) as ck:
        with pytest.raises(Crash):
            run(setup, crashing, ck)
    with ckpt.Checkpointer(str(tmp_path / "c"), keep_last=2, keep_best=1) as ck:
        again = run(setup, draw, ck, resume=True)
    assert again.resumed_from is not None
    assert again.params_sha256 == full.params_sha256
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in again.history] == strip
    assert (again.bytes_down, again.bytes_up) == (full.bytes_down, full.bytes_up)


def test_partition_must_cover_the_draw(setup):
    rnd, ev, meta0, opt0, val, partition = setup
    s = FedSchedule(rounds=2, eval_every=2)
    with pytest.raises(ValueError, match="has no task in this round"):
        federated_train(
            rnd,
            ev,
            meta0,
            opt0,
            lambda r: make_tasks(1, 10),
            partition,
            val,
            s,
            jax.random.PRNGKey(0),
            (-10.0, 10.0),
        )
