"""Tests of the meta-step benchmark harness (benchmarks.meta_step): the three executions of the
meta-step compute the same meta-gradient, FLOP counting is exact where it can be checked by hand,
the targets are computed as documented, the harness builds the registry's learners, and a tiny
in-process run produces every documented key of benchmark.json. No timing is asserted."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.meta_step import config, flops, harness, machine, measure, problems, report, steps
from metarec import meta
from metarec.data.tasks import Examples, Task, index_tasks
from metarec.meta import step as mstep
from metarec.models import melu


# ----------------------------------------------------------------------------------------------
# a tiny model with a stochastic (dropout) path, so the per-task key routing is checked too
# ----------------------------------------------------------------------------------------------
def init_params(key, d=3, h=4):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "l1": {"w": jax.random.normal(k1, (d, h)) * 0.7, "b": jnp.zeros((h,))},
        "l2": {"w": jax.random.normal(k2, (h,)) * 0.7, "b": jax.random.normal(k3, ()) * 0.1},
    }


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
    support = ex(ns, w, ns - np.arange(T) % 3)
    return Task(support=support, query=ex(nq, w, np.full(T, nq)), user=np.arange(T))


MASK = {"l1": {"w": False, "b": False}, "l2": {"w": True, "b": True}}
LEARNERS = {  # three different meta-gradient structures: 2nd-order, learned rates, implicit
    "maml": lambda: meta.maml(apply_fn, inner_steps=2, inner_lr=0.1, adapt_mask=MASK),
    "metasgd": lambda: meta.metasgd(apply_fn, inner_steps=1, inner_lr=0.1, adapt_mask=MASK),
    "imaml": lambda: meta.imaml(
        apply_fn, inner_steps=3, inner_lr=0.1, adapt_mask=MASK, lam=2.0, cg_steps=3
    ),
}


def _leaf_pairs(a, b):
    """Corresponding leaves of two pytrees of the same structure."""
    return zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)


def _captured(step, learner, tasks, weights, key, prepare=jax.device_put):
    """Meta-gradient (and metrics) of one step, read from the grad_capture optimizer state."""
    params = learner.init(init_params(jax.random.PRNGKey(0)))
    opt = steps.grad_capture()
    new_params, grads, metrics = step(params, opt.init(params), prepare(tasks), weights, key)
    # grad_capture's updates are zero: the parameters must not move
    for a, b in _leaf_pairs(new_params, params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return grads, metrics


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_loop_and_map_match_vmap_meta_gradient(name):
    learner = LEARNERS[name]()
    T = 5
    tasks = make_tasks(1, T)
    weights = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0])  # one padded task must be ignored by all three
    key = jax.random.PRNGKey(7) if name != "imaml" else None
    opt = steps.grad_capture()

    def run(mode, **kw):
        step = steps.make_step(learner, opt, mode, clip_norm=100.0)
        return _captured(step, learner, tasks, weights, key, **kw)

    g_vmap, m_vmap = run("vmap")
    g_map, m_map = run("map")
    g_loop, m_loop = run("loop", prepare=steps.LoopStep.prepare)
    assert float(optax.tree.norm(g_vmap)) > 1e-3  # a real, non-trivial gradient
    for other, m in ((g_map, m_map), (g_loop, m_loop)):
        for a, b in _leaf_pairs(g_vmap, other):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(float(m["loss"]), float(m_vmap["loss"]), rtol=1e-5)
        assert float(m["weight"]) == 4.0


def test_meta_gradient_is_the_mean_of_single_task_gradients():
    """Independent reference: average of learner.task_grad over the real tasks (no harness code)."""
    learner = LEARNERS["maml"]()
    tasks = make_tasks(2, 4)
    params = init_params(jax.random.PRNGKey(0))
    tg = jax.jit(learner.task_grad)
    one = [jax.tree_util.tree_map(lambda a, t=t: jnp.asarray(a[t]), tasks) for t in range(4)]
    ref = [tg(params, task)[1] for task in one]
    ref = jax.tree_util.tree_map(lambda *g: sum(g) / 4, *ref)
    loop = steps.make_step(learner, steps.grad_capture(), "loop")
    g_loop, _ = _captured(loop, learner, tasks, jnp.ones(4), None, steps.LoopStep.prepare)
    for a, b in _leaf_pairs(ref, g_loop):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_map_and_loop_apply_the_same_optimizer_update_as_library_step():
    learner = LEARNERS["maml"]()
    tasks = make_tasks(3, 4)
    params = init_params(jax.random.PRNGKey(1))
    opt = optax.adam(1e-2)
    outs = {}
    for mode in ("vmap", "map", "loop"):  # "sparse" needs lookup tables: test_meta_step_tables
        step = steps.make_step(learner, opt, mode, clip_norm=0.05)  # clipping active
        prep = steps.LoopStep.prepare if mode == "loop" else jax.device_put
        p, s = params, opt.init(params)
        for _ in range(2):
            p, s, m = step(p, s, prep(tasks), jnp.ones(4), None)
        outs[mode] = p
    for mode in ("map", "loop"):
        for a, b in _leaf_pairs(outs["vmap"], outs[mode]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the harness builds the registry's learners
# ----------------------------------------------------------------------------------------------
def _task_grad_program(learner, meta_params, task) -> str:
    """The traced meta-gradient program of one task (equal programs give equal numbers)."""
    return str(jax.make_jaxpr(learner.task_grad)(meta_params, task, jax.random.PRNGKey(3)))


@pytest.fixture(scope="module")
def pools():
    """Task pools shared by the harness problems of this module (built once)."""
    return {}


@pytest.mark.parametrize("name", ["maml", "reptile", "imaml"])
def test_harness_learner_is_the_cold_start_learner(name, pools):
    """The harness's learner is the algorithm's factory called with the cold-start settings: the
    decision layers adapted, except Reptile (every parameter); iMAML with lam 1.0 and 5
    conjugate-gradient steps."""
    cfg = config.BenchConfig(
        learner=name, meta_batch=2, support=6, query=4, inner_steps=2, width=8, embed_dim=4
    )
    problem = problems.build_problem(cfg, pools)
    task = index_tasks(next(problems.sample_batches(problem.pool, 2)), 0)
    task = jax.tree_util.tree_map(jnp.asarray, task)
    common = dict(inner_steps=2, inner_lr=0.05)
    decision = melu.adapt_filter("decision")
    factories = {
        "maml": lambda mask, **kw: meta.maml(problem.apply_fn, adapt_mask=mask, **common, **kw),
        "reptile": lambda mask: meta.reptile(problem.apply_fn, adapt_mask=mask, **common),
        "imaml": lambda mask, **kw: meta.imaml(problem.apply_fn, adapt_mask=mask, **common, **kw),
    }
    expected, other = {
        "maml": (factories["maml"](decision), factories["maml"](decision, remat=True)),
        "reptile": (factories["reptile"](None), factories["reptile"](decision)),
        "imaml": (
            factories["imaml"](decision, lam=1.0, cg_steps=5),
            factories["imaml"](decision, lam=1.0, cg_steps=4),
        ),
    }[name]
    got = _task_grad_program(problem.learner, problem.meta_params, task)
    assert got == _task_grad_program(expected, problem.meta_params, task)
    assert got != _task_grad_program(other, problem.meta_params, task)  # the check can fail


# ----------------------------------------------------------------------------------------------
# FLOP counting
# ----------------------------------------------------------------------------------------------
def test_count_flops_matmul_exact_and_scan_multiplied():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    f = flops.count_flops(lambda x, y: x @ y, a, b)
    assert f["matmul_flops"] == 2 * 8 * 16 * 4 and f["other_flops"] == 0 and f["flops"] > 0
    # batched dot: [5, 8, 16] x [5, 16, 4]
    batched = jax.vmap(lambda x, y: x @ y)
    g = flops.count_flops(batched, jnp.ones((5, 8, 16)), jnp.ones((5, 16, 4)))
    assert g["matmul_flops"] == 5 * 2 * 8 * 16 * 4

    w = jnp.ones((16, 16))

    def loop(x, k):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=k)[0]

    one = flops.count_flops(lambda x: loop(x, 1), a)
    ten = flops.count_flops(lambda x: loop(x, 10), a)
    assert one["matmul_flops"] == 2 * 8 * 16 * 16
    assert ten["matmul_flops"] == 10 * one["matmul_flops"]
    assert ten["other_flops"] == 10 * one["other_flops"] == 10 * 8 * 16  # tanh, one per element


def test_count_flops_agrees_with_xla_on_loop_free_program_and_counts_maml():
    """On a program without loops XLA's cost analysis and the jaxpr count agree on the
    matmul-dominated total; on the MAML meta-gradient (a scan) the jaxpr count is larger because
    XLA counts the loop body once."""
    x = jnp.ones((64, 32))
    w1, w2 = jnp.ones((32, 64)) * 0.01, jnp.ones((64, 8)) * 0.01
    f = jax.grad(lambda a, b: jnp.sum(jnp.tanh(x @ a) @ b))
    ours = flops.count_flops(f, w1, w2)
    xla = flops.xla_cost(jax.jit(f).lower(w1, w2).compile())
    assert xla["flops"] > 0 and xla["bytes_accessed"] > 0
    assert abs(ours["flops"] - xla["flops"]) / xla["flops"] < 0.2

    learner = LEARNERS["maml"]()
    tasks = jax.tree_util.tree_map(jnp.asarray, make_tasks(0, 3))
    params = init_params(jax.random.PRNGKey(0))
    step = mstep.make_meta_step(learner, optax.sgd(0.1), jit=False)
    got = flops.count_flops(step, params, optax.sgd(0.1).init(params), tasks, jnp.ones(3))
    assert got["flops"] > 0 and got["matmul_flops"] > 0


def test_matmul_peak_and_memory_helpers_positive():
    p = machine.matmul_peak("float32", sizes=(64, 128), min_time=0.01)
    assert p["flops_per_s"] > 0 and p["best_n"] in (64, 128)
    c = jax.jit(lambda v: jnp.sin(v) @ v.T).lower(jnp.ones((32, 32))).compile()
    mem = machine.compiled_memory(c)
    assert mem["argument_bytes"] == 32 * 32 * 4 and mem["output_bytes"] == 32 * 32 * 4
    machine.reset_peak_rss()
    rss = machine.peak_rss_bytes()
    assert isinstance(rss, int) and rss > 0


def test_profile_names_each_op_by_its_primitive():
    from benchmarks.meta_step import profile

    bwd = 'op_name="jit(step)/transpose(jvp(f))/dot_general"'
    combined = 'op_name="jit(s)/(shard_map/psum:sm/psum)"'  # XLA's name for a combined op
    hlo = (
        f"  %d.1 = f32[2] dot(%a, %b), metadata={{{bwd}}}\n"
        f"  ROOT %ar = f32[] all-reduce(%x), metadata={{{combined}}}"
    )
    assert profile._sources(hlo) == {"d.1": "dot_general (bwd)", "ar": "psum"}


def test_cpu_vector_flags_read_from_cpuinfo_text():
    intel = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw amx_tile\n"
    assert machine.cpu_vector_flags(intel) == [
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "amx_tile",
    ]
    assert machine.cpu_vector_flags("Features\t: fp asimd sve\n") == ["asimd", "sve"]
    assert machine.cpu_vector_flags("model name\t: ?\n") == []
    assert isinstance(machine.machine_info()["cpu_vector_flags"], list)


def test_bench_config_validation_names_field():
    with pytest.raises(ValueError, match="learner"):
        config.BenchConfig(learner="sgd").validate()
    with pytest.raises(ValueError, match="chunk"):
        config.BenchConfig(meta_batch=10, chunk=3).validate()
    with pytest.raises(ValueError, match="modes"):
        config.BenchConfig(modes=("pmap",)).validate()
    with pytest.raises(ValueError, match="remat does not apply to imaml"):
        config.BenchConfig(learner="imaml", remat=True).validate()
    with pytest.raises(ValueError, match="preset"):
        config.make_grid("huge")
    grid, settings = config.make_grid("quick")
    assert [c.learner for c in grid] == ["maml"] and grid[0].modes == ("vmap", "map", "loop")
    head = grid[0]
    assert (head.meta_batch, head.support, head.query, head.inner_steps) == (32, 64, 16, 5)
    full, _ = config.make_grid("default")
    assert {c.learner for c in full if c.section == "headline"} == set(config.LEARNER_NAMES)
    assert max(c.meta_batch for c in full) == 1024


def test_gpu_preset_grid():
    grid, settings = config.make_grid("gpu")
    head = [c for c in grid if c.section == "headline"]
    assert head[0] == grid[0] and head[0].learner == "maml"
    assert head[0].modes == ("vmap", "map", "loop")
    assert {c.learner for c in head} == set(config.LEARNER_NAMES)
    scaling = [c for c in grid if c.section == "meta_batch"]
    assert [c.meta_batch for c in scaling if not c.remat] == list(config.GPU_META_BATCHES)
    (remat,) = [c for c in scaling if c.remat]
    assert remat.meta_batch == max(config.GPU_META_BATCHES)
    assert {c.dtype for c in grid if c.section == "dtype"} == {"bfloat16"}
    assert settings.skip_out_of_memory and not settings.ceiling and not settings.profile
    # the CPU presets still raise on out of memory
    assert not config.make_grid("default")[1].skip_out_of_memory
    only, _ = config.make_grid("gpu", learners=["maml"], sections=["headline"])
    assert [(c.learner, c.section) for c in only] == [("maml", "headline")]


def _tiny_settings(**kw):
    fields = dict(
        min_time=0.0,
        min_steps=2,
        matmul_sizes=(64,),
        matmul_min_time=0.01,
        memory_steps=(),
        profile=False,
        ceiling=False,
    )
    return config.Settings(**(fields | kw))


def test_device_batches_equal_host_batches():
    pool, _ = problems.synthetic_pool(10, 6, 4, seed=3)
    host = problems.sample_batches(pool, 4, seed=5)
    dev = problems.device_batches(pool, 4, seed=5)
    for _ in range(4):  # past the end of the first epoch (10 tasks, batches of 4)
        h, d = next(host), next(dev)
        assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(d))
        for a, b in zip(jax.tree_util.tree_leaves(h), jax.tree_util.tree_leaves(d), strict=True):
            np.testing.assert_array_equal(np.asarray(b), a)


@pytest.mark.slow  # over 6 s in the default suite (2026-12-07); CI runs `make test-slow` too
def test_device_input_gives_the_same_steps():
    """Device-side input feeds the step the same batches as host input: after the same number of
    steps from the same start, the parameters are equal."""
    cfg = config.BenchConfig(
        learner="maml", meta_batch=4, support=6, query=4, inner_steps=1, width=8, embed_dim=4,
        dropout=0.0, section="headline",
    )  # fmt: skip
    out = {}
    for device_input in (False, True):
        problem = problems.build_problem(cfg, {}, seed=0)
        r = measure.measure(
            problem, "vmap", min_time=0.0, min_steps=3, max_steps=3, device_input=device_input
        )  # fmt: skip
        assert r["device_input"] is device_input and r["finite"] and r["n_steps"] == 3
        out[device_input] = r["final_loss"]
    assert out[True] == pytest.approx(out[False], rel=1e-6)
    loop = measure.measure(
        problems.build_problem(cfg, {}, seed=0), "loop", min_time=0.0, min_steps=1, max_steps=1,
        device_input=True, warmup_s=0.05,
    )  # fmt: skip
    assert loop["device_input"] is False  # the per-task loop keeps host input
    assert loop["finite"] and loop["n_steps"] == 1


def test_out_of_memory_is_recorded_and_skipped(monkeypatch):
    """A configuration that runs out of device memory is listed under ``failures`` and the run goes
    on (GPU preset); any other error, or out of memory without the setting, still raises."""
    sizes = dict(support=6, query=4, inner_steps=1, width=8, embed_dim=4, dropout=0.0)
    small = config.BenchConfig(learner="maml", meta_batch=2, section="meta_batch", **sizes)
    big = config.BenchConfig(learner="maml", meta_batch=4, section="meta_batch", **sizes)
    real = harness.measure

    def fake(problem, mode, **kw):
        if problem.cfg.meta_batch == 4:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.")
        return real(problem, mode, **kw)

    monkeypatch.setattr(harness, "measure", fake)
    settings = _tiny_settings(skip_out_of_memory=True)
    res = harness.run_benchmark([big, small], settings, log_fn=lambda m: None)
    assert [r["n_tasks"] for r in res["records"]] == [2]
    (fail,) = res["failures"]
    assert fail["label"] == big.short() and fail["mode"] == "vmap"
    assert fail["error"].startswith("RESOURCE_EXHAUSTED")
    text = report.format_report(res)
    assert big.short() in text and "RESOURCE_EXHAUSTED" in text
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        harness.run_benchmark([big], _tiny_settings(), log_fn=lambda m: None)

    def broken(problem, mode, **kw):
        raise RuntimeError("INVALID_ARGUMENT: shapes differ")

    monkeypatch.setattr(harness, "measure", broken)
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        harness.run_benchmark([small], settings, log_fn=lambda m: None)


# ----------------------------------------------------------------------------------------------
# targets, on a hand-made result
# ----------------------------------------------------------------------------------------------
def _record(label, mode, steps_per_s, section="headline", peak_fraction=None, **cfg_kw):
    cfg = config.BenchConfig(**(config.HEADLINE | cfg_kw), section=section)
    return {
        "label": label,
        "section": section,
        "mode": mode,
        "config": cfg.as_dict(),
        "steps_per_s": steps_per_s,
        "step_ms": 1e3 / steps_per_s,
        "flops_per_step": 1e9,
        "peak_fraction": peak_fraction,
    }


def test_check_targets_on_hand_computed_values():
    head = "maml headline"
    records = [
        _record(head, "loop", 20.0),  # 50 ms per step
        _record(head, "vmap", 40.0),
        _record(head, "map", 60.0),
        _record("maml chunk=8", "vmap", 80.0, section="chunk", chunk=8),  # the same step, chunked
        _record("maml T=64", "vmap", 1000.0, section="meta_batch", meta_batch=64),  # another step
        _record("fomaml headline", "vmap", 500.0, learner="fomaml"),  # another learner
        _record("maml W=512", "vmap", 1.0, section="large", peak_fraction=0.3),
        _record("maml W=256", "vmap", 1.0, section="width", peak_fraction=0.1),
        _record(head, "vmap", 1.0, section="meta_batch", peak_fraction=0.9),  # not a large config
    ]
    comparison = {
        "section": "headline",
        "label": head,
        "config": records[0]["config"],
        "vmap_over_loop": 2.0,
    }
    result = {
        "comparisons": [comparison],
        "records": records,
        "matmul_peak": {"float32": {"flops_per_s": 1e11}},
    }
    t = harness.check_targets(result)
    speed = t["vmap_over_loop_maml_mb32"]
    # 1 GFLOP at 100 GFLOP/s takes 10 ms; the loop takes 50 ms: at most 5x faster than the loop
    assert speed["bound"] == pytest.approx(5.0, rel=1e-12)
    assert speed["value"] == 2.0 and speed["met"] is False and speed["where"] == head
    assert speed["best"] == pytest.approx(4.0) and speed["best_mode"] == "maml chunk=8 vmap"
    large = t["large_config_peak_fraction"]
    assert large == {"value": 0.3, "target": 0.25, "met": True, "where": "maml W=512 vmap"}

    empty = harness.check_targets({"comparisons": [], "records": [], "matmul_peak": {}})
    assert empty["vmap_over_loop_maml_mb32"]["value"] is None
    assert empty["vmap_over_loop_maml_mb32"]["met"] is None
    assert empty["vmap_over_loop_maml_mb32"]["bound"] is None
    assert empty["large_config_peak_fraction"]["value"] is None


# ----------------------------------------------------------------------------------------------
# a tiny in-process run: every documented key present, JSON-serialisable, targets evaluated
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_tiny_run_has_documented_keys(tmp_path):
    sizes = dict(meta_batch=4, support=6, query=4, inner_steps=2, width=8, embed_dim=4)
    cfg = config.BenchConfig(
        learner="maml", dropout=0.0, modes=("vmap", "loop"), section="headline", **sizes
    )
    settings = config.Settings(
        min_time=0.0,
        min_steps=2,
        matmul_sizes=(64,),
        matmul_min_time=0.01,
        memory_steps=(1,),
        memory_config=dict(meta_batch=2, support=4, query=2, width=8, embed_dim=4),
        profile=True,
        ceiling_min_time=0.0,
    )
    res = harness.run_benchmark([cfg], settings, log_fn=lambda m: None, command="test")
    assert set(harness.TOP_KEYS) <= set(res)
    assert res["compile_s"] > 0 and res["compute_s"] > 0  # JAX's compile events, summed
    assert res["compile_s"] + res["compute_s"] == pytest.approx(res["wall_s"], abs=2e-3)
    assert len(res["records"]) == 2
    for r in res["records"]:
        assert set(measure.RECORD_KEYS) <= set(r)
        assert r["steps_per_s"] > 0 and r["flops_per_step"] > 0 and r["compile_s"] > 0
        assert r["finite"] and r["support"] == 6 and r["query"] == 4
        assert 0 <= r["input_wait_fraction"] <= 1
    (c,) = res["comparisons"]
    assert c["vmap_over_loop"] > 0 and c["vmap_over_map"] is None
    memory = res["memory_vs_inner_steps"]
    assert [(e["inner_steps"], e["remat"]) for e in memory] == [(1, False), (1, True)]
    t = res["targets"]["vmap_over_loop_maml_mb32"]
    assert t["value"] == c["vmap_over_loop"]
    assert t["bound"] > 0  # its formula: test_check_targets_on_hand_computed_values
    loop = next(r for r in res["records"] if r["mode"] == "loop")
    vm = next(r for r in res["records"] if r["mode"] == "vmap")
    assert t["best"] == pytest.approx(vm["steps_per_s"] / loop["steps_per_s"])
    assert t["best_mode"].endswith("vmap")
    for r in res["records"]:
        assert r["sys_cpu_ms_per_step"] >= 0 and r["user_cpu_ms_per_step"] >= 0
    # the vmap record gets its matmul ceiling (benchmarks.meta_step.ceiling), the loop none
    (ceil,) = res["ceilings"]["steps"]
    assert (ceil["label"], ceil["mode"]) == (vm["label"], "vmap")
    # achieved over ceiling = the step's matmul seconds over its measured seconds
    assert vm["ceiling_fraction"] == pytest.approx(ceil["matmul_s"] / (vm["step_ms"] / 1e3))
    assert vm["ceiling_peak_fraction"] > 0 and loop["ceiling_flops_per_s"] is None
    assert res["ceilings"]["square"]["flops_per_s"] > 0
    assert set(res["machine"]["malloc"]) == {"glibc", "tuned", "env"}
    prof = next(iter(res["profiles"].values()))
    assert "error" not in prof, prof.get("error")
    assert prof["op_s"] > 0 and sum(prof["fractions"].values()) == pytest.approx(1.0)
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(res, default=str))
    assert set(json.loads(path.read_text())) >= set(harness.TOP_KEYS)
    assert "targets:" in report.format_report(res)
    assert f"(compile {res['compile_s']:.0f} s, compute" in report.format_report(res)


def test_trace_summary_on_a_hand_made_timeline():
    """Busy time is the union of the events (overlaps counted once); per-step figures divide by
    the steps traced; only device planes are summarised when there is one."""
    from types import SimpleNamespace as NS

    from benchmarks.meta_step import trace

    assert trace._union_ns([(0, 10), (5, 15), (20, 30)]) == 25
    ev = [NS(name="gemm", start_ns=0, duration_ns=10), NS(name="gemm", start_ns=5, duration_ns=10)]
    ev.append(NS(name="copy", start_ns=40, duration_ns=10))
    ev.append(NS(name="marker", start_ns=45, duration_ns=0))  # instant events are skipped
    gpu = NS(name="/device:GPU:0", lines=[NS(name="Stream #1(Compute)", events=ev)])
    host = NS(name="/host:CPU", lines=[NS(name="worker", events=ev)])
    (line,) = trace.summarise_planes([host, gpu], n_steps=2)
    assert line["plane"] == "/device:GPU:0" and line["events_per_step"] == 1.5
    assert line["busy_ms_per_step"] == pytest.approx(25 / 2 * 1e-6)
    assert line["busy_fraction"] == pytest.approx(25 / 50)
    assert line["top"][0] == ["gemm", pytest.approx(20 / 2 * 1e-6)]
    # without a device plane (a CPU trace) the host's non-Python lines are summarised
    (line,) = trace.summarise_planes([host], n_steps=1)
    assert line["line"] == "worker" and line["events_per_step"] == 3


def test_trace_step_runs_on_this_backend(tmp_path):
    from benchmarks.meta_step import trace

    cfg = config.BenchConfig(
        learner="maml", meta_batch=4, support=6, query=4, inner_steps=1, width=8, embed_dim=4,
        section="trace",
    )  # fmt: skip
    r = trace.trace_step(cfg, n_steps=2, keep_dir=str(tmp_path))
    assert r["meta_batch"] == 4 and r["flops_per_step"] > 0 and r["wall_ms_per_step_traced"] > 0
    assert r["lines"] and all(ln["busy_ms_per_step"] > 0 for ln in r["lines"])
    assert (tmp_path / "T4.xplane.pb").exists()
