"""Tests of the benchmark helpers (metarec.bench): the three executions of the meta-step compute the
same meta-gradient, FLOP counting is exact where it can be checked by hand, and a tiny in-process run
produces every documented key of benchmark.json. No timing is asserted."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarec import bench, meta
from metarec.meta import step as train
from metarec.data.tasks import Examples, Task


# ----------------------------------------------------------------------------------------------
# a tiny model with a stochastic (dropout) path, so the per-task key routing is checked too
# ----------------------------------------------------------------------------------------------
def init_params(key, d=3, h=4):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"l1": {"w": jax.random.normal(k1, (d, h)) * 0.7, "b": jnp.zeros((h,))},
            "l2": {"w": jax.random.normal(k2, (h,)) * 0.7, "b": jax.random.normal(k3, ()) * 0.1}}  # fmt: skip


def apply_fn(params, x, key=None, train=False):
    if train and key is not None:
        x = x * jax.random.bernoulli(key, 0.8, x.shape) / 0.8
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    return h @ params["l2"]["w"] + params["l2"]["b"]


def make_tasks(seed, T, d=3, ns=6, nq=5):
    rng = np.random.default_rng(seed)

    def ex(n, w, n_real):
        x = rng.normal(size=(T, n, d)).astype(np.float32)
        y = (np.einsum("tnd,td->tn", x, w) + 0.1 * rng.normal(size=(T, n))).astype(np.float32)
        mask = (np.arange(n)[None, :] < n_real[:, None]).astype(np.float32)
        return Examples(x=x, y=y, mask=mask)

    w = rng.normal(size=(T, d)) + 1.0
    return Task(support=ex(ns, w, ns - np.arange(T) % 3), query=ex(nq, w, np.full(T, nq)), user=np.arange(T))


MASK = {"l1": {"w": False, "b": False}, "l2": {"w": True, "b": True}}
LEARNERS = {  # three different meta-gradient structures: 2nd-order, learned rates, implicit
    "maml": lambda: meta.maml(apply_fn, inner_steps=2, inner_lr=0.1, adapt_mask=MASK),
    "metasgd": lambda: meta.metasgd(apply_fn, inner_steps=1, inner_lr=0.1, adapt_mask=MASK),
    "imaml": lambda: meta.imaml(apply_fn, inner_steps=3, inner_lr=0.1, adapt_mask=MASK, lam=2.0, cg_steps=3),
}


def _captured(step, learner, tasks, weights, key, prepare=jax.device_put):
    """Meta-gradient (and metrics) of one step, read from the grad_capture optimizer state."""
    params = learner.init(init_params(jax.random.PRNGKey(0)))
    opt = bench.grad_capture()
    new_params, grads, metrics = step(params, opt.init(params), prepare(tasks), weights, key)
    # grad_capture's updates are zero: the parameters must not move
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return grads, metrics


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_loop_and_map_match_vmap_meta_gradient(name):
    learner = LEARNERS[name]()
    T = 5
    tasks = make_tasks(1, T)
    weights = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0])  # one padded task must be ignored by all three
    key = jax.random.PRNGKey(7) if name != "imaml" else None
    opt = bench.grad_capture()
    g_vmap, m_vmap = _captured(bench.make_step(learner, opt, "vmap", clip_norm=100.0), learner, tasks, weights, key)
    g_map, m_map = _captured(bench.make_step(learner, opt, "map", clip_norm=100.0), learner, tasks, weights, key)
    loop = bench.make_step(learner, opt, "loop", clip_norm=100.0)
    g_loop, m_loop = _captured(loop, learner, tasks, weights, key, prepare=bench.LoopStep.prepare)
    assert float(optax.tree.norm(g_vmap)) > 1e-3  # a real, non-trivial gradient
    for other, m in ((g_map, m_map), (g_loop, m_loop)):
        for a, b in zip(jax.tree_util.tree_leaves(g_vmap), jax.tree_util.tree_leaves(other)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(float(m["loss"]), float(m_vmap["loss"]), rtol=1e-5)
        assert float(m["weight"]) == 4.0


def test_meta_gradient_is_the_mean_of_single_task_gradients():
    """Independent reference: average of learner.task_grad over the real tasks (no bench code)."""
    learner = LEARNERS["maml"]()
    tasks = make_tasks(2, 4)
    params = init_params(jax.random.PRNGKey(0))
    tg = jax.jit(learner.task_grad)
    ref = [tg(params, jax.tree_util.tree_map(lambda a: jnp.asarray(a[t]), tasks))[1] for t in range(4)]
    ref = jax.tree_util.tree_map(lambda *g: sum(g) / 4, *ref)
    opt = bench.grad_capture()
    g_loop, _ = _captured(bench.make_step(learner, opt, "loop"), learner, tasks, jnp.ones(4), None, bench.LoopStep.prepare)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(g_loop)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_map_and_loop_apply_the_same_optimizer_update_as_library_step():
    learner = LEARNERS["maml"]()
    tasks = make_tasks(3, 4)
    params = init_params(jax.random.PRNGKey(1))
    opt = optax.adam(1e-2)
    outs = {}
    for mode in bench.MODES:
        step = bench.make_step(learner, opt, mode, clip_norm=0.05)  # clipping active
        prep = bench.LoopStep.prepare if mode == "loop" else jax.device_put
        p, s = params, opt.init(params)
        for _ in range(2):
            p, s, m = step(p, s, prep(tasks), jnp.ones(4), None)
        outs[mode] = p
    for mode in ("map", "loop"):
        for a, b in zip(jax.tree_util.tree_leaves(outs["vmap"]), jax.tree_util.tree_leaves(outs[mode])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# FLOP counting
# ----------------------------------------------------------------------------------------------
def test_count_flops_matmul_exact_and_scan_multiplied():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    f = bench.count_flops(lambda x, y: x @ y, a, b)
    assert f["matmul_flops"] == 2 * 8 * 16 * 4 and f["other_flops"] == 0 and f["flops"] > 0
    # batched dot: [5, 8, 16] x [5, 16, 4]
    g = bench.count_flops(jax.vmap(lambda x, y: x @ y), jnp.ones((5, 8, 16)), jnp.ones((5, 16, 4)))
    assert g["matmul_flops"] == 5 * 2 * 8 * 16 * 4

    w = jnp.ones((16, 16))

    def loop(x, k):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=k)[0]

    one, ten = bench.count_flops(lambda x: loop(x, 1), a), bench.count_flops(lambda x: loop(x, 10), a)
    assert one["matmul_flops"] == 2 * 8 * 16 * 16
    assert ten["matmul_flops"] == 10 * one["matmul_flops"]
    assert ten["other_flops"] == 10 * one["other_flops"] == 10 * 8 * 16  # tanh, one per element


def test_count_flops_agrees_with_xla_on_loop_free_program_and_counts_maml():
    """On a program without loops XLA's cost analysis and the jaxpr count agree on the matmul-dominated
    total; on the MAML meta-gradient (a scan) the jaxpr count is larger because XLA counts the
    loop body once."""
    x = jnp.ones((64, 32))
    w1, w2 = jnp.ones((32, 64)) * 0.01, jnp.ones((64, 8)) * 0.01
    f = jax.grad(lambda a, b: jnp.sum(jnp.tanh(x @ a) @ b))
    ours = bench.count_flops(f, w1, w2)
    xla = bench.xla_cost(jax.jit(f).lower(w1, w2).compile())
    assert xla["flops"] > 0 and xla["bytes_accessed"] > 0
    assert abs(ours["flops"] - xla["flops"]) / xla["flops"] < 0.2

    learner = LEARNERS["maml"]()
    tasks = jax.tree_util.tree_map(jnp.asarray, make_tasks(0, 3))
    params = init_params(jax.random.PRNGKey(0))
    step = train.make_meta_step(learner, optax.sgd(0.1), jit=False)
    got = bench.count_flops(step, params, optax.sgd(0.1).init(params), tasks, jnp.ones(3))
    assert got["flops"] > 0 and got["matmul_flops"] > 0


def test_matmul_peak_and_memory_helpers_positive():
    p = bench.matmul_peak("float32", sizes=(64, 128), min_time=0.01)
    assert p["flops_per_s"] > 0 and p["best_n"] in (64, 128)
    c = jax.jit(lambda v: jnp.sin(v) @ v.T).lower(jnp.ones((32, 32))).compile()
    mem = bench.compiled_memory(c)
    assert mem["argument_bytes"] == 32 * 32 * 4 and mem["output_bytes"] == 32 * 32 * 4
    bench.reset_peak_rss()
    rss = bench.peak_rss_bytes()
    assert rss is None or rss > 0


def test_bench_config_validation_names_field():
    with pytest.raises(ValueError, match="learner"):
        bench.BenchConfig(learner="sgd").validate()
    with pytest.raises(ValueError, match="chunk"):
        bench.BenchConfig(meta_batch=10, chunk=3).validate()
    with pytest.raises(ValueError, match="modes"):
        bench.BenchConfig(modes=("pmap",)).validate()
    with pytest.raises(ValueError, match="preset"):
        bench.make_grid("huge")
    grid, settings = bench.make_grid("quick")
    assert [c.learner for c in grid] == ["maml"] and grid[0].modes == ("vmap", "map", "loop")
    assert (grid[0].meta_batch, grid[0].support, grid[0].query, grid[0].inner_steps) == (32, 64, 16, 5)
    full, _ = bench.make_grid("default")
    assert {c.learner for c in full if c.section == "headline"} == set(bench.LEARNER_NAMES)
    assert max(c.meta_batch for c in full) == 1024


# ----------------------------------------------------------------------------------------------
# a tiny in-process run: every documented key present, JSON-serialisable, targets evaluated
# ----------------------------------------------------------------------------------------------
def test_tiny_run_has_documented_keys(tmp_path):
    cfg = bench.BenchConfig(learner="maml", meta_batch=4, support=6, query=4, inner_steps=2, width=8,
                            embed_dim=4, dropout=0.0, modes=("vmap", "loop"), section="headline")  # fmt: skip
    settings = bench.Settings(min_time=0.0, min_steps=2, matmul_sizes=(64,), matmul_min_time=0.01,
                              memory_steps=(1,), memory_config=dict(meta_batch=2, support=4, query=2, width=8, embed_dim=4),
                              profile=True)  # fmt: skip
    res = bench.run_benchmark([cfg], settings, log_fn=lambda m: None, command="test")
    assert set(bench.TOP_KEYS) <= set(res)
    assert len(res["records"]) == 2
    for r in res["records"]:
        assert set(bench.RECORD_KEYS) <= set(r)
        assert r["steps_per_s"] > 0 and r["flops_per_step"] > 0 and r["compile_s"] > 0
        assert r["finite"] and r["support"] == 6 and r["query"] == 4
        assert 0 <= r["input_wait_fraction"] <= 1
    (c,) = res["comparisons"]
    assert c["vmap_over_loop"] > 0 and c["vmap_over_map"] is None
    assert [(e["inner_steps"], e["remat"]) for e in res["memory_vs_inner_steps"]] == [(1, False), (1, True)]
    t = res["targets"]["vmap_over_loop_maml_mb32"]
    assert t["value"] == c["vmap_over_loop"]
    # the attainable ratio: the loop's step time over the step's FLOPs at the measured peak
    loop = next(r for r in res["records"] if r["mode"] == "loop")
    vm = next(r for r in res["records"] if r["mode"] == "vmap")
    peak = res["matmul_peak"]["float32"]["flops_per_s"]
    assert t["bound"] == pytest.approx(loop["step_ms"] / 1e3 / (loop["flops_per_step"] / peak), rel=1e-9)
    assert t["best"] == pytest.approx(vm["steps_per_s"] / loop["steps_per_s"]) and t["best_mode"].endswith("vmap")
    assert all(r["sys_cpu_ms_per_step"] >= 0 and r["user_cpu_ms_per_step"] >= 0 for r in res["records"])
    assert set(res["machine"]["malloc"]) == {"glibc", "tuned", "env"}
    prof = next(iter(res["profiles"].values()))
    assert "error" in prof or prof["op_s"] > 0
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(res, default=str))
    assert set(json.loads(path.read_text())) >= set(bench.TOP_KEYS)
    assert "targets:" in bench.format_report(res)
