"""Multi-process meta-training on JAX's distributed runtime: two worker processes on localhost
(CPU, gloo collectives), each feeding half of every meta-batch to the jitted meta-step, end with
the parameters of one process over the whole meta-batch: with the launcher's hand-written loop and
with the library's ``meta_train`` (validation, early stopping, checkpoints, resume)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.distributed.run import Setup, train, train_meta
from metarec.training import distributed
from tests.conftest import REPO

WORKER_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path, n: int, args: list[str]) -> list[str]:
    """Start ``n`` launcher processes and wait for all; kill every one still running if one fails
    or the time is up, and fail with the stderr of each. Returns their stdouts."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    procs, logs = [], []
    try:
        for pid in range(n):
            out, err = (open(tmp_path / f"worker{pid}.{s}", "w+") for s in ("out", "err"))
            logs.append((out, err))
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.distributed.main",
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={n}",
                f"--process_id={pid}",
                *args,
            ]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err))
        failed = None
        for pid, p in enumerate(procs):
            try:
                if p.wait(timeout=WORKER_TIMEOUT_S) != 0:
                    failed = failed or f"worker {pid} exited with status {p.returncode}"
            except subprocess.TimeoutExpired:
                failed = failed or f"worker {pid} still running after {WORKER_TIMEOUT_S}s"
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        texts.append((out.read(), err.read()))
        out.close(), err.close()
    if failed:
        detail = "\n".join(f"--- worker {i} stderr:\n{e[-3000:]}" for i, (_, e) in enumerate(texts))
        pytest.fail(f"{failed}\n{detail}")
    return [o for o, _ in texts]


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_two_processes_match_one_process_over_the_whole_meta_batch(tmp_path):
    setup = Setup(learner="maml", meta_batch=8, steps=3, support=8, query=4, inner_steps=2)
    wd = tmp_path / "dist"
    outs = _run_workers(tmp_path, 2, [f"--workdir={wd}"])
    info = json.loads((wd / "distributed.json").read_text())
    assert info["process_count"] == 2 and len(info["devices"]) == 2
    assert info["rows"] == [0, 4]  # process 0 fed only the first half of every meta-batch
    assert all("process 1/2" in o or "process 0/2" in o for o in outs)

    ref = train(setup)  # one process, the whole meta-batch
    got = np.load(wd / "params.npz")
    assert sorted(got.files) == sorted(ref["params"])
    for name, want in ref["params"].items():
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(info["losses"], ref["losses"], rtol=1e-5)
    # the steps moved the parameters: equality is not the trivial one of an untrained model
    assert not np.allclose(ref["losses"][0], ref["losses"][-1])


def test_initialize_wants_all_three_arguments_or_none():
    with pytest.raises(ValueError, match="together, or none"):
        distributed.initialize("localhost:1234", 2, None)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        distributed.initialize("localhost:1234", 2, 2)


@pytest.mark.parametrize("loop", ["hand", pytest.param("meta_train", marks=pytest.mark.slow)])
def test_a_meta_batch_that_does_not_split_over_the_processes_is_one_error_line(tmp_path, loop):
    with pytest.raises(pytest.fail.Exception) as e:
        _run_workers(tmp_path, 2, [f"--loop={loop}", "--meta_batch=7", "--steps=1"])
    assert "distributed: error: process_rows: a batch of 7 rows does not split evenly" in str(
        e.value
    )
    assert "Traceback" not in str(e.value)


# ---------------------------------------------------------------- the library's meta_train
META = Setup(loop="meta_train", meta_batch=8, steps=2, epochs=2, patience=2, val_users=8)
META_ARGS = ["--loop=meta_train", "--meta_batch=8", "--steps=2", "--epochs=2", "--patience=2"]


@pytest.fixture(scope="module")
def one_process():
    """``meta_train`` in this process over the whole meta-batch: the reference."""
    ref = train_meta(META)
    assert ref["steps"] == 4 and len(ref["history"]) == 2
    # validation moved: the equality below is not the trivial one of an untrained model
    assert ref["history"][0]["val_mae"] != ref["history"][1]["val_mae"]
    return ref


def _assert_same_run(wd, ref):
    info = json.loads((wd / "distributed.json").read_text())
    got = np.load(wd / "params.npz")
    assert sorted(got.files) == sorted(ref["params"])
    for name, want in ref["params"].items():
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        [h["val_mae"] for h in info["history"]], [h["val_mae"] for h in ref["history"]], rtol=1e-5
    )
    assert (info["best_epoch"], info["steps"]) == (ref["best_epoch"], ref["steps"])
    return info


def _epoch_lines(out: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if "val_mae" in line]


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_meta_train_on_two_processes_matches_one_process(tmp_path, one_process):
    wd = tmp_path / "mt"
    # the tasks read on demand (the interface of tasks on disk), against the in-memory reference
    outs = _run_workers(tmp_path, 2, [*META_ARGS, "--source=reader", f"--workdir={wd}"])
    info = _assert_same_run(wd, one_process)
    assert info["process_count"] == 2 and info["resumed_from"] is None
    # each process read only its half of every meta-batch: 2 epochs x 2 batches x 4 rows
    assert all("read 16 task rows" in o for o in outs)
    # both processes validated alike (meta_train also checks their val MAEs are equal)
    assert _epoch_lines(outs[0]) == _epoch_lines(outs[1]) and len(_epoch_lines(outs[0])) == 2
    # one checkpoint per epoch end, one metrics file (process 0's): 4 step + 2 epoch records
    assert sorted(os.listdir(wd / "ckpt")) == ["2", "4"]
    assert len((wd / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_meta_train_stopped_mid_epoch_and_resumed_on_two_processes_matches_one_process(
    tmp_path, one_process
):
    wd = tmp_path / "mt"
    # a checkpoint after every step; stopped after step 3 (mid epoch 2, the best so far: step 2)
    args = [*META_ARGS, "--ckpt_every=1", f"--workdir={wd}"]
    outs = _run_workers(tmp_path, 2, [*args, "--stop_after_steps=3"])
    assert all("stopped before meta-step 4" in o for o in outs)
    assert not (wd / "distributed.json").exists()
    outs = _run_workers(tmp_path, 2, [*args, "--resume"])
    assert all("resumed from checkpoint step 3 (epoch 2, batch 1/2)" in o for o in outs)
    info = _assert_same_run(wd, one_process)
    assert info["resumed_from"] == 3


def test_launcher_setup_refuses_unknown_choices():
    with pytest.raises(ValueError, match="loop='x'; allowed: hand, meta_train"):
        Setup(loop="x").validate()
    with pytest.raises(ValueError, match="source='disk'; allowed: memory, reader"):
        Setup(loop="meta_train", source="disk").validate()
    with pytest.raises(ValueError, match="dataset='ml-100k' needs loop=meta_train"):
        Setup(dataset="ml-100k").validate()
