"""map_in_processes: results in item order, and everything a job logs or records reaches the
parent's log function, metrics writer and logging handlers, in the job's own order."""

from __future__ import annotations

import logging
import os

import pytest

from metarec.training import compile_time
from metarec.training.processes import WorkerGroup, map_in_processes


def _job(item, *, log_fn, metrics):
    """Module-level, so a spawned worker can import it."""
    if item < 0:
        raise ValueError(f"item {item}: negative")
    log_fn(f"job {item} pid {os.getpid()}")
    logging.getLogger("metarec.test_processes").info("library log of job %d", item)
    for step in (1, 2, 3):
        metrics.write({"unit": f"job{item}", "step": step, "value": item * step})
    metrics.truncate(f"job{item}", 2)
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: x * item + 1)(jnp.arange(3.0)).block_until_ready()  # one compile event
    return item * item


class _Recorder:
    def __init__(self):
        self.calls = []

    def write(self, record):
        self.calls.append(("write", record["unit"], record["step"], record["value"]))

    def truncate(self, unit, after_step):
        self.calls.append(("truncate", unit, after_step))


def test_jobs_run_in_other_processes_and_report_here(caplog):
    lines, rec = [], _Recorder()
    workers0, own0 = compile_time.worker_compile_seconds(), compile_time.compile_seconds()
    stages0 = compile_time.worker_stage_seconds()
    with caplog.at_level(logging.INFO):
        out = map_in_processes(_job, [3, 1, 2], workers=2, log_fn=lines.append, metrics=rec)
    assert out == [9, 1, 4]
    assert sorted(line.split(" pid ")[0] for line in lines) == ["job 1", "job 2", "job 3"]
    assert all(int(line.split(" pid ")[1]) != os.getpid() for line in lines)
    for item in (1, 2, 3):
        mine = [c for c in rec.calls if c[1] == f"job{item}"]
        assert mine == [
            ("write", f"job{item}", 1, item),
            ("write", f"job{item}", 2, 2 * item),
            ("write", f"job{item}", 3, 3 * item),
            ("truncate", f"job{item}", 2),
        ]
    logs = [r for r in caplog.records if r.name == "metarec.test_processes"]
    assert sorted(r.getMessage() for r in logs) == [f"library log of job {i}" for i in (1, 2, 3)]
    assert all(r.process != os.getpid() for r in logs)
    # the workers' compile seconds are counted apart from this process's own
    timing = compile_time.split_seconds(60.0, own0, None, workers0, stages0)
    assert timing["worker_compile_seconds"] > 0 and timing["compute_seconds"] <= 60.0
    stages = timing["worker_compile_stages"]  # the workers' seconds, stage by stage
    assert set(stages) == {"trace", "lower", "backend_compile"} and stages["trace"] > 0
    assert sum(stages.values()) == pytest.approx(timing["worker_compile_seconds"], abs=0.01)
    assert "worker_compile_seconds" not in compile_time.split_seconds(1.0, 0.0, None, None)


def test_a_job_error_is_raised_here_with_its_message():
    with pytest.raises(ValueError, match="item -1: negative"):
        map_in_processes(_job, [1, -1], workers=2, log_fn=lambda m: None, metrics=_Recorder())
    with pytest.raises(ValueError, match="workers must be at least 1"):
        map_in_processes(_job, [1], workers=0)


def _setup(key, *, log_fn, metrics):
    log_fn(f"setup {key}")
    return {"key": key, "pid": os.getpid(), "calls": 0}


def _call(state, add, *, log_fn, metrics):
    if add < 0 and state["key"] == 1:
        raise ValueError(f"key {state['key']}: negative")
    state["calls"] += 1  # the state persists in its worker between calls
    log_fn(f"call {state['key']}")
    return state["key"] + add, state["calls"], state["pid"]


def test_a_worker_group_keeps_each_keys_state_between_calls():
    lines = []
    with WorkerGroup(_setup, [0, 1, 2], workers=2, log_fn=lines.append) as group:
        first = group.map(_call, 10)
        second = group.map(_call, 100)
        # a failing call is raised here after the others return; the group stays usable
        with pytest.raises(ValueError, match="key 1: negative"):
            group.map(_call, -1)
        third = group.map(_call, 0)
    assert [r[0] for r in first] == [10, 11, 12] and [r[0] for r in second] == [100, 101, 102]
    assert [r[1] for r in first] == [1, 1, 1] and [r[1] for r in second] == [2, 2, 2]
    assert [r[1] for r in third] == [4, 3, 4]  # key 1's failed call counted nothing
    pids = [r[2] for r in first]
    assert pids == [r[2] for r in second] == [r[2] for r in third]
    # keys dealt to the two workers in turn, none in this process
    assert pids[0] == pids[2] != pids[1] and os.getpid() not in pids
    assert sorted(lines[:3]) == ["setup 0", "setup 1", "setup 2"]
    assert sorted(lines[3:6]) == ["call 0", "call 1", "call 2"]
    group.close()  # closing again does nothing
    with pytest.raises(ValueError, match="workers must be at least 1"):
        WorkerGroup(_setup, [0], workers=0)


def _bad_setup(key, *, log_fn, metrics):
    if key == 1:
        raise ValueError(f"key {key}: cannot prepare")
    return key


def test_a_worker_group_whose_setup_fails_raises_it_here():
    with pytest.raises(ValueError, match="key 1: cannot prepare"):
        WorkerGroup(_bad_setup, [0, 1], workers=2, log_fn=lambda m: None)
