"""The benchmark result as plain-text tables (``benchmark.txt`` and the terminal)."""

from __future__ import annotations

import collections


def malloc_line(m: dict | None) -> str:
    """One line describing the allocator settings of :func:`machine.malloc_status`."""
    if not m:
        return "unknown"
    if not m["glibc"]:
        return "not glibc (settings do not apply)"
    env = " ".join(f"{k}={v}" for k, v in m["env"].items() if v is not None) or "glibc defaults"
    return ("tuned: " if m["tuned"] else "") + env


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def _times(x):
    return "-" if x is None else f"{x:.1f}x"


def _header(result: dict) -> list[str]:
    m = result["machine"]
    load = result["load_average"]
    lines = [
        f"command: {result['command']}",
        f"machine: {m['cpu_model']} ({m['cpu_count']} cores; "
        f"{' '.join(m.get('cpu_vector_flags') or ['?'])}), jax {m['jax']} / jaxlib "
        f"{m['jaxlib']}, backend {m['backend']}, devices {len(m['devices'])}; load average before "
        f"{load['before']} after {load['after']}",
        f"allocator: {malloc_line(m.get('malloc'))}",
    ]
    if m["backend"] != "cpu":
        precision = m.get("matmul_precision") or "backend default"
        lines.append(f"device: {m.get('device_kind')}; f32 matmul precision: {precision}")
    for dt, p in result["matmul_peak"].items():
        lines.append(
            f"measured matmul peak ({dt}): {p['flops_per_s'] / 1e9:.1f} GFLOP/s at n={p['best_n']}"
        )
    bw = result["memory_bandwidth"]["bytes_per_s"]
    lines.append(f"measured memory bandwidth: {bw / 1e9:.2f} GB/s")
    return lines


def _records(result: dict) -> list[str]:
    hdr = (
        f"{'section':11s} {'configuration':46s} {'mode':4s} {'steps/s':>9s} {'tasks/s':>10s} "
        f"{'compile s':>9s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'%peak':>6s} {'temp MiB':>9s} "
        f"{'RSS MiB':>8s} {'wait %':>6s} {'faults':>7s} {'sys ms':>6s}"
    )
    # device memory (GPU/TPU): the allocator's peak so far in the process, so a running maximum
    device = any(r.get("device_peak_bytes") for r in result["records"])
    if device:
        hdr += f" {'dev MiB':>8s}"
    lines = ["", hdr, "-" * len(hdr)]
    for r in result["records"]:
        lines.append(
            f"{r['section']:11s} {r['label']:46s} {r['mode']:4s} {r['steps_per_s']:9.2f} "
            f"{r['tasks_per_s']:10.1f} {r['compile_s']:9.1f} {r['flops_per_step'] / 1e9:10.3f} "
            f"{r['achieved_flops_per_s'] / 1e9:8.2f} {100 * (r['peak_fraction'] or 0):6.1f} "
            f"{_mib(r['temp_bytes']):>9s} {_mib(r['peak_rss_bytes']):>8s} "
            f"{100 * r['input_wait_fraction']:6.2f} {r['minor_faults_per_step']:7.0f} "
            f"{r.get('sys_cpu_ms_per_step', float('nan')):6.1f}"
            + (f" {_mib(r.get('device_peak_bytes')):>8s}" if device else "")
        )
    for f in result.get("failures") or []:  # older benchmark.json files have none
        lines.append(f"{f['section']:11s} {f['label']:46s} {f['mode']:4s} {f['error'][:80]}")
    return lines


def _comparisons(result: dict) -> list[str]:
    if not result["comparisons"]:
        return []
    lines = ["", "same meta-step, three executions (ratios of steps/s, measured in this run):"]
    for c in result["comparisons"]:
        line = (
            f"  {c['label']:46s} vmap/loop {_times(c['vmap_over_loop']):>8s}  "
            f"vmap/map {_times(c['vmap_over_map']):>8s}  map/loop {_times(c['map_over_loop']):>8s}"
        )
        if c.get("sparse_over_vmap") is not None:
            line += f"  sparse/vmap {_times(c['sparse_over_vmap']):>8s}"
        lines.append(line)
    return lines


def _memory(result: dict) -> list[str]:
    if not result["memory_vs_inner_steps"]:
        return []
    lines = ["", "memory vs inner steps (vmapped 2nd-order MAML, XLA compiled temp MiB):"]
    rows = collections.defaultdict(dict)
    for e in result["memory_vs_inner_steps"]:
        rows[e["inner_steps"]][e["remat"]] = e["temp_bytes"]
    lines.append(f"  {'K':>4s} {'no remat':>10s} {'remat':>10s}")
    for k, d in sorted(rows.items()):
        lines.append(f"  {k:4d} {_mib(d.get(False)):>10s} {_mib(d.get(True)):>10s}")
    return lines


def _profiles(result: dict) -> list[str]:
    lines = []
    for label, p in result["profiles"].items():
        if "error" in p:
            lines.append(f"profile {label}: {p['error']}")
            continue
        by_share = sorted(p["fractions"].items(), key=lambda kv: -kv[1])
        fr = ", ".join(f"{k} {100 * v:.0f}%" for k, v in by_share if v > 0)
        lines += [
            "",
            f"profile {label}: wall {1e3 * p['wall_s']:.1f} ms/step, XLA op time (summed over "
            f"threads) {1e3 * p['op_s']:.1f} ms/step: {fr}",
        ]
        for name, cat, s in p["top_ops"][:6]:
            lines.append(f"    {name:40s} {cat:12s} {1e3 * s:8.3f} ms")
        if p.get("by_source"):
            lines.append("    by source (category: JAX primitive of the fused op's root):")
            for name, s in p["by_source"][:8]:
                lines.append(f"      {name:42s} {1e3 * s:8.3f} ms {100 * s / p['op_s']:5.1f}%")
    return lines


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _ceilings(result: dict) -> list[str]:
    c = result.get("ceilings") or {}
    rows = [r for r in result["records"] if r.get("ceiling_flops_per_s")]
    if not rows:
        return []
    lines = [
        "",
        "matmul ceiling at the step's own shapes (every dot of the step timed alone at its shape; "
        "the step's FLOPs over that time):",
    ]
    if c.get("square"):
        sq = c["square"]
        lines.append(
            f"  big square n={sq['n']} timed the same way: {sq['flops_per_s'] / 1e9:.1f} GFLOP/s"
        )
    if c.get("square_sharded"):
        sq = c["square_sharded"]
        lines.append(
            f"  big square n={sq['n']} on {sq['devices']} devices at once: "
            f"{sq['flops_per_s'] / 1e9:.1f} GFLOP/s (all devices together)"
        )
    p = result["matmul_peak"].get("float32", {})
    if p.get("peak_from"):
        lines.append(
            f"  peak used for every fraction: {p['flops_per_s'] / 1e9:.1f} GFLOP/s, the fastest "
            f"timing of the square ({p['peak_from']}); a sharded step's dots are timed on all "
            "its devices at once"
        )
    by = {(s["label"], s["mode"]): s for s in c.get("steps", [])}
    hdr = (
        f"  {'configuration':46s} {'mode':6s} {'ms/step':>8s} {'matmul ms':>9s} {'%peak':>6s} "
        f"{'ceiling %peak':>13s} {'% of ceiling':>12s} {'CPU ms':>7s} {'%peak per CPU-s':>15s}"
    )
    lines += [hdr, "  " + "-" * (len(hdr) - 2)]
    for r in rows:
        s = by.get((r["label"], r["mode"]), {})
        mm = s.get("matmul_s")
        lines.append(
            f"  {r['label']:46s} {r['mode']:6s} {r['step_ms']:8.1f} "
            f"{'-' if mm is None else f'{1e3 * mm:.1f}':>9s} {100 * r['peak_fraction']:6.1f} "
            f"{100 * r['ceiling_peak_fraction']:13.1f} {100 * r['ceiling_fraction']:12.1f} "
            f"{r['user_cpu_ms_per_step'] + r['sys_cpu_ms_per_step']:7.1f} "
            f"{_pct(r.get('cpu_peak_fraction')):>15s}"
        )
    return lines


def _targets(result: dict) -> list[str]:
    lines = ["", "targets:"]
    for name, t in result["targets"].items():
        v = "not measured" if t["value"] is None else f"{t['value']:.3g}"
        met = {True: "MET", False: "NOT MET", None: "-"}[t["met"]]
        lines.append(f"  {name:28s} {v:>12s} (target >= {t['target']})  {met}  [{t['where']}]")
        if name == "headline_peak_fraction":
            if t.get("bound") is not None:
                lines.append(
                    f"  {'':28s} highest matmul ceiling at the step's own shapes: "
                    f"{t['bound']:.3g} of peak"
                    + ("  -> out of reach on this machine" if t["bound"] < t["target"] else "")
                )
            if t.get("cpu_value") is not None:
                lines.append(
                    f"  {'':28s} best FLOPs per CPU-second over the matmul's: "
                    f"{t['cpu_value']:.3g} (the fraction of peak with every core kept busy)"
                )
            continue
        if t.get("bound") is not None:
            out_of_reach = t["bound"] < t["target"]
            lines.append(
                f"  {'':28s} attainable on this machine at 100% of the matmul peak: "
                f"{t['bound']:.2g}x"
                + ("  -> out of reach for any implementation here" if out_of_reach else "")
            )
        if t.get("best") is not None:
            lines.append(
                f"  {'':28s} fastest library execution of the step vs the loop: {t['best']:.2f}x"
                f" [{t['best_mode']}]"
            )
    return lines


def format_report(result: dict) -> str:
    """The benchmark as plain-text tables (records, mode ratios, memory vs inner steps, profiles,
    device check, targets)."""
    lines = _header(result) + _records(result) + _comparisons(result) + _memory(result)
    lines += _profiles(result) + _ceilings(result)
    if result["devices"]:
        d = result["devices"]
        match = "match" if d["grads_match"] else "MISMATCH"
        lines += [
            "",
            f"devices: {d['n_devices']} (of {d['device_count']}); sharded vs single-device "
            f"meta-gradient max |diff| {d['max_abs_grad_diff']:.2e} (max |g| "
            f"{d['max_abs_grad']:.2e}) -> {match}",
        ]
        if "grads_match_sparse" in d:  # older benchmark.json files have no sparse check
            match = "match" if d["grads_match_sparse"] else "MISMATCH"
            lines.append(
                f"  with row-gathered tables: max |diff| {d['max_abs_grad_diff_sparse']:.2e} "
                f"-> {match}"
            )
    lines += _targets(result)
    timing = f"wall time {result['wall_s']:.0f} s"
    if "compile_s" in result:  # older benchmark.json files have no split
        timing += f" (compile {result['compile_s']:.0f} s, compute {result['compute_s']:.0f} s)"
    lines.append(timing)
    return "\n".join(lines)
