r"""Meta-RL recommendation benchmark: held-out users, CTR / return / regret vs adaptation episodes.

    python -m experiments.meta_rl --workdir runs/meta_rl            # ml-100k, seeds 0,1,2
    python -m experiments.meta_rl --workdir runs/meta_rl --resume   # continue an interrupted run
    python -m experiments.meta_rl --dataset synthetic --quick --workdir /tmp/rl

Writes ``<workdir>/rl_results.json``::

    {"results": {method: {"ctr"|"return"|"regret": {n_episodes: {"mean", "std"}}}},
     "oracle_ctr": {"mean", "std"}, "config": {...}, "command": "...", "seeds": [...],
     "versions": {...}, "data_sha256": "...", "simulator_sha256": {seed: "..."}, "run": {...},
     "per_seed": [{"train_logs", "params_sha256", "resumed", "timings", ...}], "invocations": [...], ...}

``<workdir>/run.json`` (command, config, seeds, package versions, devices, git commit, data SHA-256;
written when the run starts), ``<workdir>/metrics.jsonl`` / ``metrics.csv`` (per (seed, method): one
``eval`` row per number of adaptation episodes, unit ``seed<s>/<method>``, and the training curves,
unit ``seed<s>/<method>/train``; TensorBoard under ``tb/`` when tensorboardX is installed), prints a
progress line per (seed, method) and the tables. The catalogue is restricted to the ``--n_items``
most-rated training items; train users are the first ``--n_train_users`` warm-train users, test users
the first ``--n_test_users`` user-cold users of each seed (see metarec/rl/benchmark.py).

Checkpoints and resume. Every training loop (PPO — also when it is only the meta-learners' warm
start —, DQN, MAML, FOMAML, Meta-SGD) saves its whole state with orbax-checkpoint every
``--checkpoint_every`` iterations (default 50) under ``checkpoints/seed<s>/<method>/<iteration>``:
params, optimizer state, the loop's PRNG key (iteration ``i`` uses row ``i`` of
``split(key, num_iterations)``, so the key and the iteration number are the whole sampler position),
DQN's target network and replay buffer, and the training metrics so far. Saves are atomic (a killed
save leaves a temporary directory that is removed on the next start). Only the newest
``--keep_checkpoints`` (default 2) are kept — there is no validation metric during RL training, so no
best-by-metric checkpoint; the newest is always the final state. A finished unit (a method's training
and evaluation, the bandits, ``oracle``, ``online``) is saved to ``units/seed<s>/<unit>.json``.
``--resume`` continues the run in ``--workdir``: finished units are read back, an unfinished training
loop continues from its newest checkpoint, and the results, training curves, metrics rows and final
parameters are bit-identical (on CPU) to an uninterrupted run (tests/test_rl_resume.py). Only
``data_dir``, ``seeds``, the learning rates and the checkpoint flags may change on resume; a workdir holding a run is
refused without ``--resume`` (``--overwrite`` deletes it). A non-finite training loss or metric stops
the run with an error naming seed, method and iteration; the piece containing it is not saved, so the
newest checkpoint is the last good state, and the message says to rerun with ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np
from absl import app, flags

from metarec.rl import benchmark
from metarec.rl import env as envlib
from metarec.rl import loop as rl_loop
from metarec.training.runlog import MetricsWriter, Progress, read_json, remove_run_files, run_metadata, write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m", "synthetic"], "Simulator source.")
flags.DEFINE_string("data_dir", None, "MovieLens directory (GroupLens or RecBole layout); default: cache.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (split, simulator fit, training, evaluation).")
flags.DEFINE_string("workdir", None, "Output directory for rl_results.json.", required=True)
flags.DEFINE_list("methods", list(benchmark.ALL_METHODS), "Methods to run.")
flags.DEFINE_integer("n_train_users", 400, "Training users (environments) per seed.")
flags.DEFINE_integer("n_test_users", 64, "Held-out users per seed.")
flags.DEFINE_integer("n_items", 100, "Catalogue size: the most-rated training items.")
flags.DEFINE_enum("reward", "click", ["click", "rating"], "Reward per click: 1, or predicted rating / 5.")
flags.DEFINE_integer("horizon", 20, "Steps per episode (truncation).")
flags.DEFINE_integer("history_len", 10, "Observed history length.")
flags.DEFINE_float("threshold", 3.5, "Affinity (rating) at which a fresh user clicks half the time.")
flags.DEFINE_float("temperature", 0.5, "Logistic link temperature (rating units).")
flags.DEFINE_float("boredom_weight", 1.0, "Satiation strength for repeated genres.")
flags.DEFINE_float("leave_growth", 0.1, "Leave probability added per consecutive unrewarded step.")
flags.DEFINE_list("adapt_episodes", ["0", "1", "2", "5", "10"], "Numbers of adaptation episodes reported.")
flags.DEFINE_integer("eval_episodes", 4, "Evaluation episodes per user and n.")
flags.DEFINE_integer("ppo_updates", 150, "PPO updates (non-meta PPO, also the meta-learners' warm start).")
flags.DEFINE_integer("dqn_iterations", 100, "DQN iterations.")
flags.DEFINE_integer("meta_iterations", 150, "Meta-training iterations.")
flags.DEFINE_integer("meta_batch", 16, "Users per meta-batch.")
flags.DEFINE_integer("inner_steps", 2, "Inner steps (one support episode each) during meta-training; evaluation "
                     "takes the same step once per adaptation episode.")
flags.DEFINE_float("inner_lr", 3.0, "Inner learning rate (Meta-SGD: its initial value).")
flags.DEFINE_list("inner_params", ["item_bias"], "Policy parameters the inner loop adapts per user (meta-training "
                  "and evaluation): top-level names of the item scorer (item_bias, item_out, item_in, hidden, user, "
                  "value) or paths such as user/bias, or 'all'. Adapting the shared history encoder from one episode "
                  "hurts (BUILD_NOTES.md).")
flags.DEFINE_enum("inner_credit", "myopic", ["myopic", "causal"], "Inner policy gradient: 'myopic' credits each "
                  "click to its own recommendation only (low variance), 'causal' is the DiCE return estimator.")
flags.DEFINE_integer("online_rounds", 5, "Online loop: rounds per streamed test user (0 = skip).")
flags.DEFINE_bool("quick", False, "Tiny sizes for a smoke run (overrides the size flags).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir: finished (seed, method) units are read back, "
                  "the unfinished training loop continues from its newest checkpoint.")
flags.DEFINE_bool("overwrite", False, "Delete this script's files in --workdir (checkpoints, units, metrics, results) "
                  "and start again.")
flags.DEFINE_integer("checkpoint_every", benchmark.RunContext.checkpoint_every,
                     "Training iterations between checkpoints (also the length of the jitted training pieces; the "
                     "results do not depend on it).", lower_bound=1)
flags.DEFINE_integer("keep_checkpoints", benchmark.RunContext.keep_checkpoints,
                     "Newest checkpoints kept per (seed, method); the newest is the final state.", lower_bound=1)
flags.register_multi_flags_validator(
    ["resume", "overwrite"], lambda f: not (f["resume"] and f["overwrite"]),
    "--resume and --overwrite contradict each other: --resume continues the run in --workdir, --overwrite deletes it",
)

# files this script owns in --workdir (the only ones --overwrite deletes)
RUN_FILES = ("checkpoints", "units", "run.json", "metrics.jsonl", "metrics.csv", "tb", "rl_results.json")
# config fields (dotted paths) that may change between a run and its --resume: where the data is, which
# seeds are run (finished ones are read back), and the learning rates (the way out of a non-finite loss)
RESUME_MUTABLE = ("data_dir", "seeds", "ppo.lr", "dqn.lr", "meta.meta_lr", "meta.inner_lr")


def _ints(values, flag):
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{flag} must be a comma-separated list of integers, got {','.join(values)}")


def make_config() -> benchmark.BenchmarkConfig:
    """Flags -> :class:`BenchmarkConfig` (all validation happens in the library)."""
    f = FLAGS
    env = envlib.EnvConfig(horizon=f.horizon, history_len=f.history_len, threshold=f.threshold,
                           temperature=f.temperature, boredom_weight=f.boredom_weight, leave_growth=f.leave_growth)
    base = benchmark.BenchmarkConfig()
    c = dataclasses.replace(
        base, dataset=f.dataset, data_dir=f.data_dir, seeds=_ints(f.seeds, "seeds"), methods=tuple(f.methods),
        n_train_users=f.n_train_users, n_test_users=f.n_test_users, n_items=f.n_items, reward=f.reward, env=env,
        adapt_episodes=_ints(f.adapt_episodes, "adapt_episodes"), eval_episodes=f.eval_episodes,
        ppo=dataclasses.replace(base.ppo, num_updates=f.ppo_updates),
        dqn=dataclasses.replace(base.dqn, num_iterations=f.dqn_iterations),
        meta=dataclasses.replace(base.meta, num_iterations=f.meta_iterations, meta_batch=f.meta_batch,
                                 inner_steps=f.inner_steps, inner_lr=f.inner_lr,
                                 inner_params=None if f.inner_params == ["all"] else tuple(f.inner_params),
                                 inner_credit=f.inner_credit),
        online_rounds=f.online_rounds,
    )
    if f.quick:
        c = dataclasses.replace(
            c, n_train_users=min(c.n_train_users, 64), n_test_users=min(c.n_test_users, 16), n_items=min(c.n_items, 30),
            env=dataclasses.replace(env, horizon=min(env.horizon, 8), history_len=min(env.history_len, 4)),
            adapt_episodes=tuple(n for n in c.adapt_episodes if n <= 2) or (0,), eval_episodes=2,
            ppo=dataclasses.replace(c.ppo, num_updates=20, num_envs=8),
            dqn=dataclasses.replace(c.dqn, num_iterations=10, num_envs=4, buffer_size=1024, batch_size=32),
            meta=dataclasses.replace(c.meta, num_iterations=10, meta_batch=4), online_rounds=min(c.online_rounds, 2),
        )
    try:
        c.validate()
    except ValueError as e:
        raise app.UsageError(str(e))
    return c


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


NonFiniteLossError = rl_loop.NonFiniteLossError  # raised by the training loops, see metarec/rl/loop.py


def check_finite_training(seed: int, method: str, metrics: dict, start: int = 0) -> None:
    """Raise :class:`NonFiniteLossError` naming seed, method, metric and the first bad iteration if
    any training metric (``loss``, returns, ...) of a piece of training starting after iteration
    ``start`` is NaN or inf (the library's loop checks first; this guards the metrics files)."""
    bad = rl_loop.first_non_finite(metrics)
    if bad is not None:
        it, name, value = bad
        n = len(np.asarray(next(iter(metrics.values()))).reshape(-1))
        raise NonFiniteLossError(
            f"seed {seed}, method {method}: non-finite training {name} ({value}) at iteration {start + it + 1} of "
            f"{start + n}; lower the method's learning rate and run again", start + it + 1)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def prepare_workdir(config_json: dict, workdir: str, resume: bool, data_sha: str | None, log_fn=print) -> list[str]:
    """Check ``workdir`` against ``resume`` and the saved ``run.json``; returns the earlier commands
    of this run (empty for a fresh one). Without ``resume`` a workdir holding checkpoints or units is
    refused; with it, only :data:`RESUME_MUTABLE` config fields may differ from the saved run."""
    os.makedirs(workdir, exist_ok=True)
    state = [p for p in ("checkpoints", "units") if os.path.exists(os.path.join(workdir, p))]
    if state and not resume:
        raise ValueError(
            f"--workdir={workdir} already holds a run ({', '.join(state)}); pass --resume to continue it, "
            "--overwrite to start it again, or choose another --workdir"
        )
    run_path = os.path.join(workdir, "run.json")
    if not resume:
        return []
    if not os.path.exists(run_path):
        log_fn(f"--resume: nothing to resume in {workdir}; starting a fresh run")
        return []
    saved = read_json(run_path)
    old, new = _flat(saved.get("config") or {}), _flat(json.loads(json.dumps(config_json)))
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<missing>") != new.get(k, "<missing>"))
    fixed = [k for k in changed if k not in RESUME_MUTABLE]
    if fixed:
        detail = "; ".join(f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}" for k in fixed)
        raise ValueError(
            f"--resume: the run in {workdir} was started with a different config ({detail}); only "
            f"{', '.join(RESUME_MUTABLE)} may change on resume. Use the original flags or a fresh --workdir"
        )
    if saved.get("data_sha256") != data_sha:
        raise ValueError(f"--resume: the data changed since the run in {workdir} started (ratings sha256 "
                         f"{saved.get('data_sha256')} -> {data_sha}); use a fresh --workdir")  # fmt: skip
    if changed:
        log_fn(f"resuming with changed settings: {', '.join(changed)}")
    return list(saved.get("invocations", [saved.get("command")]))


def data_sha256(config: benchmark.BenchmarkConfig) -> str | None:
    """SHA-256 of the MovieLens ratings file behind the simulator (None for the synthetic simulator,
    whose per-seed environments are digested instead: ``simulator_sha256``)."""
    if config.dataset == "synthetic":
        return None
    from metarec import data as mdata

    return mdata.data_checksum(mdata.load_dataset(config.dataset, data_dir=config.data_dir))


class RunRecorder:
    """The :class:`benchmark.BenchmarkHooks` of a run: metrics rows, a progress line per (seed,
    method), non-finite training checks and per-seed simulator digests."""

    def __init__(self, config: benchmark.BenchmarkConfig, workdir: str, progress_stream=None, resume: bool = False):
        self.writer = MetricsWriter(workdir)
        self.resume = resume
        self.bar = Progress(len(config.seeds) * len(config.methods), desc="meta_rl", stream=progress_stream)
        self.simulator_sha256: dict[str, str] = {}

    def hooks(self) -> benchmark.BenchmarkHooks:
        return benchmark.BenchmarkHooks(on_simulator=self.on_simulator, on_train=self.on_train,
                                        on_method=self.on_method, on_stage=self.on_stage,
                                        on_unit_start=self.on_unit_start, on_unit_read=self.on_unit_read)

    def on_simulator(self, seed, sim):
        self.simulator_sha256[str(seed)] = benchmark.simulator_digest(sim)

    def on_unit_start(self, seed, method, start):
        if self.resume:  # rows a killed run logged after the checkpoint it continues from
            self.writer.truncate(f"seed{seed}/{method}/train", start)

    def on_train(self, seed, method, metrics, start=0):
        check_finite_training(seed, method, metrics, start)
        n = len(next(iter(metrics.values()))) if metrics else 0
        for i in range(n):
            row = {k: float(np.mean(v[i])) for k, v in metrics.items()}
            self.writer.write({"unit": f"seed{seed}/{method}/train", "kind": "train", "step": start + i + 1, **row})

    def on_unit_read(self, seed, method, curve):
        self.bar.update(unit=f"seed{seed}/{method}", read_back=True)

    def on_method(self, seed, method, curve):
        if self.resume:  # rows of an evaluation a killed run did not finish saving
            self.writer.truncate(f"seed{seed}/{method}", -1)
        for n in sorted({n for per_n in curve.values() for n in per_n}):
            row = {metric: per_n[n] for metric, per_n in curve.items() if n in per_n}
            self.writer.write({"unit": f"seed{seed}/{method}", "kind": "eval", "step": int(n), "seed": seed,
                               "method": method, "adapt_episodes": int(n), **row})
        self.bar.update(unit=f"seed{seed}/{method}", ctr=float(curve["ctr"][max(curve["ctr"])]))

    def on_stage(self, seed, stage, seconds):
        self.bar.update(self.bar.done, stage=f"seed{seed}/{stage}", s=float(seconds))

    def close(self):
        self.bar.close()
        self.writer.close()


def run(config: benchmark.BenchmarkConfig, workdir: str, argv: list[str] | None = None,
        progress_stream=None, *, resume: bool = False, overwrite: bool = False, checkpoint_every: int | None = None,
        keep_checkpoints: int | None = None, log_fn=print) -> dict:  # fmt: skip
    """The benchmark with its bookkeeping: writes ``run.json`` first, then ``metrics.jsonl``,
    checkpoints and unit files while it runs and ``rl_results.json`` at the end (atomically).
    ``resume`` continues the run in ``workdir`` (:class:`benchmark.RunContext`); ``overwrite``
    deletes it first. Returns the ``rl_results.json`` payload."""
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other")
    if overwrite:
        remove_run_files(workdir, RUN_FILES)
    t = time.time()
    sha = data_sha256(config)
    meta = run_metadata(_jsonable(config), argv)
    invocations = prepare_workdir(meta["config"], workdir, resume, sha, log_fn)
    run_info = meta | {"seeds": list(config.seeds), "data_sha256": sha, "invocations": invocations + [meta["command"]]}
    write_json_atomic(os.path.join(workdir, "run.json"), run_info)
    d = benchmark.RunContext()
    ctx = benchmark.RunContext(workdir, resume, checkpoint_every or d.checkpoint_every,
                               keep_checkpoints or d.keep_checkpoints)
    rec = RunRecorder(config, workdir, progress_stream, resume=resume)
    try:
        payload = benchmark.run_benchmark(config, rec.hooks(), ctx)
    finally:
        rec.close()
    payload["config"] = run_info["config"]
    payload["command"] = meta["command"]
    payload["seeds"] = list(config.seeds)
    payload["versions"] = meta["versions"]
    payload["data_sha256"] = sha
    payload["simulator_sha256"] = rec.simulator_sha256
    payload["run"] = {k: meta[k] for k in ("argv", "devices", "backend", "git_commit", "platform", "started_utc")}
    payload["invocations"] = run_info["invocations"]
    payload["wall_s"] = round(time.time() - t, 1)
    write_json_atomic(os.path.join(workdir, "run.json"), run_info | {"simulator_sha256": rec.simulator_sha256,
                                                                     "wall_s": payload["wall_s"]})  # fmt: skip
    write_json_atomic(os.path.join(workdir, "rl_results.json"), payload)
    return payload


def main(argv):
    del argv
    logging.getLogger("metarec.rl").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint save at INFO through absl
    config = make_config()
    try:
        payload = run(config, FLAGS.workdir, argv=["-m", "experiments.meta_rl", *sys.argv[1:]], resume=FLAGS.resume,
                      overwrite=FLAGS.overwrite, checkpoint_every=FLAGS.checkpoint_every,
                      keep_checkpoints=FLAGS.keep_checkpoints, log_fn=lambda m: print(m, flush=True))  # fmt: skip
    except (NonFiniteLossError, ValueError, FileNotFoundError) as e:
        print(f"meta_rl: error: {e}", file=sys.stderr)
        sys.exit(1)
    path = os.path.join(FLAGS.workdir, "rl_results.json")
    for metric in ("ctr", "return", "regret"):
        print(benchmark.format_table(payload, metric), end="\n\n")
    for s in payload["per_seed"]:
        if "online" in s:
            print(f"seed {s['seed']} online ({s['online']['policy']}): CTR per round "
                  f"{[round(v, 3) for v in s['online']['round_ctr']]}, running CTR {s['online']['final_running_ctr']:.3f}")
    print(f"wrote {path} in {payload['wall_s']}s")


if __name__ == "__main__":
    app.run(main)
