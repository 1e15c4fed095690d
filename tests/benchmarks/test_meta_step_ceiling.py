"""The matmul ceiling of the meta-step benchmark (:mod:`benchmarks.meta_step.ceiling`): every dot
of a step is found with its batch axes and loop count, the timed dots add up to the step's matmul
FLOPs, the timing loop is not hoisted away, and the headline target reads its numbers as
documented. No speed is asserted beyond physical plausibility."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks.meta_step import ceiling, config, flops, harness
from metarec.meta import step as mstep
from tests.benchmarks.test_meta_step import LEARNERS, init_params, make_tasks


def test_dot_shapes_keep_batch_axes_and_loop_counts():
    w = jnp.ones((16, 4))

    def f(x):  # x [3, 8, 16]: a vmapped dot inside a scan of length 5
        def body(c, _):
            return c, jax.vmap(lambda a: a @ w)(c)

        return jax.lax.scan(body, x, None, length=5)[1]

    x = jnp.ones((3, 8, 16))
    (s,) = ceiling.dot_shapes(f, x)
    assert s["count"] == 5 and s["flops"] == 2 * 3 * 8 * 16 * 4
    assert s["lhs"] == [3, 8, 16] and s["rhs"] == [16, 4]
    assert flops.count_flops(f, x)["matmul_flops"] == s["count"] * s["flops"]


def test_ceiling_covers_every_matmul_flop_of_the_maml_step():
    learner = LEARNERS["maml"]()
    params = learner.init(init_params(jax.random.PRNGKey(0)))
    opt = optax.sgd(0.1)
    step = mstep.make_meta_step(learner, opt, chunk_size=2)
    tasks = jax.tree_util.tree_map(jnp.asarray, make_tasks(0, 4))
    args = (params, opt.init(params), tasks, jnp.ones(4), jax.random.PRNGKey(1))
    shapes = ceiling.dot_shapes(step, *args)
    total = sum(s["count"] * s["flops"] for s in shapes)
    assert total == flops.count_flops(step, *args)["matmul_flops"] > 0
    assert {s["lhs"][0] for s in shapes if len(s["lhs"]) == 3} == {2}  # vmapped in chunks of 2


def test_shape_ceiling_sums_its_timed_dots():
    w = jnp.ones((32, 16))

    def f(x):
        return jnp.tanh(x @ w) @ w.T

    c = ceiling.shape_ceiling(f, jnp.ones((8, 32)), peak_flops_per_s=1e12, min_time=0.0)
    assert c["matmul_flops"] == 2 * (2 * 8 * 32 * 16)
    assert c["matmul_s"] == pytest.approx(sum(s["count"] * s["seconds"] for s in c["shapes"]))
    assert c["matmul_peak_fraction"] == c["matmul_flops_per_s"] / 1e12
    assert sum(s["time_share"] for s in c["shapes"]) == pytest.approx(1.0)


def test_timed_dot_is_not_hoisted_out_of_its_loop():
    n = 256
    key = ((n, n), (n, n), "float32", "float32", (((1,), (0,)), ((), ())), None)
    seconds = ceiling.time_dot(key, min_time=0.0)
    assert 2 * n**3 / seconds < 5e12  # a hoisted dot would look near-free per iteration


def _record(mode, peak_fraction, ceiling_peak_fraction, section="ceiling", **kw):
    cfg = config.BenchConfig(**(config.HEADLINE | kw), section=section)
    return {
        "label": cfg.short(),
        "section": section,
        "mode": mode,
        "config": cfg.as_dict(),
        "peak_fraction": peak_fraction,
        "ceiling_peak_fraction": ceiling_peak_fraction,
        "ceiling_fraction": peak_fraction / ceiling_peak_fraction,
        "steps_per_s": 1.0,
    }


def test_headline_target_takes_the_best_execution_and_highest_ceiling():
    records = [
        _record("vmap", 0.10, 0.25),
        _record("sparse", 0.20, 0.30, chunk=8),
        _record("map", 0.15, 0.33),
        _record("vmap", 0.90, 0.95, meta_batch=64),  # another step: not the headline
        _record("vmap", 0.80, 0.95, section="width"),  # another section
    ]
    t = harness.check_targets({"comparisons": [], "records": records, "matmul_peak": {}})
    h = t["headline_peak_fraction"]
    assert h["value"] == 0.20 and h["met"] is False and h["target"] == 0.35
    assert h["where"].endswith("chunk=8 sparse") and h["bound"] == 0.33
    assert h["best_ceiling_fraction"] == pytest.approx(0.20 / 0.30)
