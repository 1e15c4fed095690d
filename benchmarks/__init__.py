"""Measurement harnesses for metarec (not installed; run them from the repository root).

``benchmarks.meta_step``: the meta-step three ways (vmap, ``lax.map``, a per-task Python loop),
with FLOPs, memory, input stalls and profiles: ``python -m benchmarks.meta_step.main --quick``.
"""
