"""Benchmark of the vmapped meta-step against ``lax.map`` and a per-task Python loop.

Per configuration (meta-learner, data, meta-batch, support size, inner steps, model width, remat,
chunking, compute dtype, devices) and per execution mode of the same meta-step, it measures
steady-state meta-steps/s and tasks/s, compile time, compiled memory and peak RSS, FLOP/s as a
fraction of the measured matmul peak, input-pipeline stalls, memory vs inner steps with and
without remat, and a per-op profile.

Modules: ``config`` (what to run, presets), ``problems`` (model, learner, task pools, input
pipeline), ``steps`` (the three executions), ``machine`` and ``flops`` (counters), ``measure``
(one record), ``profile``, ``harness`` (the whole run and its targets), ``report`` (tables),
``main`` (the command line).
"""
