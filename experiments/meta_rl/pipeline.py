"""Meta-RL recommendation on held-out users: CTR / return / regret vs adaptation episodes.

:func:`main` runs the seeds of a config (``configs/default.py``; the work itself is
:mod:`experiments.meta_rl.runner`) with the run's bookkeeping and writes to ``workdir``:

* ``rl_results.json``::

    {"results": {method: {"ctr"|"return"|"regret"|"cum_regret"(|"ndcg" for slates):
                          {n_episodes: {"mean", "std"}}}},
     "oracle_ctr": {"mean", "std"}, "config": {...}, "command": "...", "seeds": [...],
     "versions": {...}, "data_sha256": "...", "simulator_sha256": {seed: "..."}, "run": {...},
     "per_seed": [{"train_logs", "params_sha256", "resumed", "timings", ...}], "invocations": [...]}

* ``config.json`` and ``run.json`` (command, config, seeds, package versions, devices, git commit,
  data SHA-256; written when the run starts), ``metrics.jsonl`` / ``metrics.csv`` (per (seed,
  method): one ``eval`` row per number of adaptation episodes, unit ``seed<s>/<method>``, and the
  training curves, unit ``seed<s>/<method>/train``; TensorBoard under ``tb/`` when tensorboardX is
  installed), the libraries' log ``meta_rl.INFO``; a progress line per (seed, method) and the
  tables on the terminal.

The catalogue is restricted to the ``n_items`` most-rated training items; train users are the first
``n_train_users`` warm-train users, test users the first ``n_test_users`` user-cold users of each
seed.

Checkpoints and resume. Every training loop (PPO — also when it is only the meta-learners' warm
start —, DQN, MAML, FOMAML, Meta-SGD) saves its whole state with orbax-checkpoint every
``checkpoint_every`` iterations under ``checkpoints/seed<s>/<method>/<iteration>``: params,
optimizer state, the loop's PRNG key (iteration ``i`` uses row ``i`` of ``split(key,
num_iterations)``, so the key and the iteration number are the whole sampler position), DQN's target
network and replay buffer, and the training metrics so far. Only the newest ``keep_checkpoints`` are
kept; the newest is always the final state. A finished unit (a method's training and evaluation,
the bandits, ``oracle``, ``online``) is saved to ``units/seed<s>/<unit>.json``. ``--resume``
continues the run in ``workdir``: finished units are read back, an unfinished training loop
continues from its newest checkpoint, and the results, training curves, metrics rows and final
parameters are bit-identical (on CPU) to an uninterrupted run. Only :data:`RESUME_MUTABLE` config
fields may change on resume. A non-finite training loss or metric stops the run with an error naming
seed, method and iteration; the piece containing it is not saved, so the newest checkpoint is the
last good state, and the message says to rerun with ``--resume``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from experiments import common
from experiments.meta_rl import runner, settings
from metarec import data as mdata
from metarec.training import runlog
from metarec.training.trainer import NonFiniteLossError, first_non_finite
from metarec.training.workdir import check_resume, record_invocation

# files this experiment owns in its workdir (the only ones --overwrite deletes, with its log)
RUN_FILES = (
    "checkpoints",
    "units",
    "config.json",
    "run.json",
    "metrics.jsonl",
    "metrics.csv",
    "tb",
    "rl_results.json",
)
# config fields that may change between a run and its --resume: where the data is, which seeds are
# run (finished ones are read back), and the learning rates (the way out of a non-finite loss)
RESUME_MUTABLE = ("data_dir", "seeds", "ppo.lr", "dqn.lr", "meta.meta_lr", "meta.inner_lr")


def check_finite_training(seed: int, method: str, metrics: dict, start: int = 0) -> None:
    """Raise :class:`NonFiniteLossError` naming seed, method, metric and the first bad iteration if
    any training metric (``loss``, returns, ...) of a piece of training starting after iteration
    ``start`` is NaN or inf (the library's loop checks first; this guards the metrics files)."""
    bad = first_non_finite(metrics)
    if bad is not None:
        it, name, value = bad
        n = len(np.asarray(next(iter(metrics.values()))).reshape(-1))
        raise NonFiniteLossError(
            f"seed {seed}, method {method}: non-finite training {name} ({value}) at iteration "
            f"{start + it + 1} of {start + n}; lower the method's learning rate and run again",
            start + it + 1,
        )


def flat(d: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted names (``"meta.inner_lr"``, as in ``--config.*``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_sha256(spec) -> str | None:
    """SHA-256 of the MovieLens ratings behind the simulator (None for the synthetic simulator,
    whose per-seed environments are digested instead: ``simulator_sha256``)."""
    if spec.dataset in settings.SIMULATED:
        return None
    return mdata.data_checksum(mdata.load_dataset(spec.dataset, data_dir=spec.data_dir))


def open_workdir(
    spec, workdir: str, argv=None, *, resume: bool, data_sha: str | None, log_fn=print
) -> dict:
    """Check ``workdir`` against ``resume`` and the saved ``config.json`` (only
    :data:`RESUME_MUTABLE` fields may change), write ``config.json`` and ``run.json``; returns the
    run metadata with the commands of every invocation of this run."""
    config = settings.recorded_config(spec)
    check_resume(
        workdir,
        flat(config),
        resume=resume,
        mutable=RESUME_MUTABLE,
        data_sha256=data_sha,
        state=("checkpoints", "units"),
        log_fn=log_fn,
    )
    meta = runlog.run_metadata(config, argv) | {"seeds": list(spec.seeds), "data_sha256": data_sha}
    record_invocation(workdir, meta, resume=resume)
    return runlog.read_json(os.path.join(workdir, "run.json"))


class RunRecorder:
    """The :class:`runner.Hooks` of a run: metrics rows, a progress line per (seed, method),
    non-finite training checks and per-seed simulator digests."""

    def __init__(self, spec, workdir: str, progress_stream=None, resume: bool = False):
        self.writer = runlog.MetricsWriter(workdir)
        self.resume = resume
        total = len(spec.seeds) * len(spec.methods)
        self.bar = runlog.Progress(total, desc="meta_rl", stream=progress_stream)
        self.simulator_sha256: dict[str, str] = {}

    def hooks(self) -> runner.Hooks:
        return runner.Hooks(
            on_simulator=self.on_simulator,
            on_train=self.on_train,
            on_method=self.on_method,
            on_stage=self.on_stage,
            on_unit_start=self.on_unit_start,
            on_unit_read=self.on_unit_read,
        )

    def on_simulator(self, seed, sim):
        self.simulator_sha256[str(seed)] = runner.simulator_digest(sim)

    def on_unit_start(self, seed, method, start):
        if self.resume:  # rows a killed run logged after the checkpoint it continues from
            self.writer.truncate(f"seed{seed}/{method}/train", start)

    def on_train(self, seed, method, metrics, start=0):
        check_finite_training(seed, method, metrics, start)
        n = len(next(iter(metrics.values()))) if metrics else 0
        for i in range(n):
            row = {k: float(np.mean(v[i])) for k, v in metrics.items()}
            unit = f"seed{seed}/{method}/train"
            self.writer.write({"unit": unit, "kind": "train", "step": start + i + 1, **row})

    def on_unit_read(self, seed, method, curve):
        self.bar.update(unit=f"seed{seed}/{method}", read_back=True)

    def on_method(self, seed, method, curve):
        if self.resume:  # rows of an evaluation a killed run did not finish saving
            self.writer.truncate(f"seed{seed}/{method}", -1)
        for n in sorted({n for per_n in curve.values() for n in per_n}):
            row = {metric: per_n[n] for metric, per_n in curve.items() if n in per_n}
            self.writer.write(
                {
                    "unit": f"seed{seed}/{method}",
                    "kind": "eval",
                    "step": int(n),
                    "seed": seed,
                    "method": method,
                    "adapt_episodes": int(n),
                    **row,
                }
            )
        self.bar.update(unit=f"seed{seed}/{method}", ctr=float(curve["ctr"][max(curve["ctr"])]))

    def on_stage(self, seed, stage, seconds):
        self.bar.update(self.bar.done, stage=f"seed{seed}/{stage}", s=float(seconds))

    def close(self):
        self.bar.close()
        self.writer.close()


def run(
    config,
    workdir: str,
    argv: list[str] | None = None,
    progress_stream=None,
    *,
    resume: bool = False,
    log_fn=print,
) -> dict:
    """The seeds of ``config`` with their bookkeeping: writes ``config.json`` / ``run.json`` first,
    then ``metrics.jsonl``, checkpoints and unit files while it runs and ``rl_results.json`` at the
    end (atomically). ``resume`` continues the run in ``workdir`` (:class:`runner.RunContext`).
    Returns the ``rl_results.json`` payload."""
    spec = settings.resolve(config)
    t = time.time()
    sha = data_sha256(spec)
    os.makedirs(workdir, exist_ok=True)
    run_info = open_workdir(spec, workdir, argv, resume=resume, data_sha=sha, log_fn=log_fn)
    ctx = runner.RunContext(workdir, resume, spec.checkpoint_every, spec.keep_checkpoints)
    rec = RunRecorder(spec, workdir, progress_stream, resume=resume)
    try:
        payload = runner.run_seeds(spec, rec.hooks(), ctx)
    finally:
        rec.close()
    run_keys = ("argv", "devices", "backend", "git_commit", "platform", "started_utc")
    payload |= {
        "config": run_info["config"],
        "command": run_info["command"],
        "seeds": list(spec.seeds),
        "versions": run_info["versions"],
        "data_sha256": sha,
        "simulator_sha256": rec.simulator_sha256,
        "run": {k: run_info[k] for k in run_keys},
        "invocations": run_info["invocations"],
        "wall_s": round(time.time() - t, 1),
    }
    done = {"simulator_sha256": rec.simulator_sha256, "wall_s": payload["wall_s"]}
    runlog.write_json_atomic(os.path.join(workdir, "run.json"), run_info | done)
    runlog.write_json_atomic(os.path.join(workdir, "rl_results.json"), payload)
    return payload


def format_table(payload: dict, metric: str = "ctr") -> str:
    """A text table ``method x n adaptation episodes`` of ``metric`` (mean ± std over seeds)."""
    res, n_seeds = payload["results"], len(payload["per_seed"])
    ns = list(next(iter(res.values()))[metric].keys())
    head = f"{metric:<12}" + "".join(f"{'n=' + n:>19}" for n in ns)
    lines = [head, "-" * len(head)]
    for name, r in res.items():
        cells = (common.format_mean_std(r[metric][n], n_seeds) for n in ns)
        lines.append(f"{name:<12}" + "".join(f"{cell:>19}" for cell in cells))
    if metric == "ctr":
        lines.append(f"{'oracle':<12}{common.format_mean_std(payload['oracle_ctr'], n_seeds):>19}")
    return "\n".join(lines)


def main(
    config,
    workdir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> dict:
    """The script body: check the config, prepare ``workdir``, run, print the tables."""
    spec = settings.resolve(config)  # a bad config fails before the workdir is touched
    common.enable_compilation_cache()
    common.prepare_workdir(workdir, "meta_rl", RUN_FILES, overwrite=overwrite)
    payload = run(config, workdir, argv, resume=resume, log_fn=lambda m: print(m, flush=True))
    print(f"training data: {payload.get('training_data')}")
    print(f"recommended method: {payload.get('recommended')}\n")
    for metric in runner.metrics_of(spec):
        print(format_table(payload, metric), end="\n\n")
    for s in payload["per_seed"]:
        if "online" in s:
            on = s["online"]
            rounds = [round(v, 3) for v in on["round_ctr"]]
            print(
                f"seed {s['seed']} online ({on['policy']}): CTR per round {rounds}, "
                f"running CTR {on['final_running_ctr']:.3f}"
            )
    print(f"wrote {os.path.join(workdir, 'rl_results.json')} in {payload['wall_s']}s")
    return payload
