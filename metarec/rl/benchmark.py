"""The meta-RL benchmark behind ``experiments/meta_rl.py`` (library side: no flags in here).

For every seed: build the simulator (MovieLens: train users = the protocol's warm-train users, test
users = its ``user_cold`` users, seed-dependent; or the synthetic latent-user simulator), train the
non-meta agents (PPO and DQN on all training users), meta-train MAML / FOMAML / Meta-SGD (warm-started
from the PPO policy), then evaluate every method on the held-out users with
:func:`metarec.rl.evaluate.adaptation_curve` after ``n`` adaptation episodes. Methods:

``random, popular, mf_greedy, egreedy, linucb, thompson`` (per-user bandits, learn every step),
``ppo`` (non-meta, trained on all training users, no adaptation), ``dqn`` (same, greedy on Q),
``ppo_scratch`` (fresh PPO per user, one update per adaptation episode),
``maml, fomaml, metasgd`` (one inner step per adaptation episode).

All jitted functions take the environments as arguments and every seed has the same numbers of
users and items, so each is compiled once for all seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import numpy as np

from metarec.rl import bandits
from metarec.rl import dqn as dqnlib
from metarec.rl import env as envlib
from metarec.rl import evaluate as ev
from metarec.rl import maml as mamllib
from metarec.rl import networks, online
from metarec.rl import ppo as ppolib
from metarec.rl import simulator as simlib

log = logging.getLogger("metarec.rl")

BANDIT_METHODS = tuple(bandits.METHODS)
POLICY_METHODS = ("ppo", "dqn", "ppo_scratch", "maml", "fomaml", "metasgd")
ALL_METHODS = BANDIT_METHODS + POLICY_METHODS


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    dataset: str = "ml-100k"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ALL_METHODS
    n_train_users: int = 400
    n_test_users: int = 64
    n_items: int = 100
    reward: str = "click"
    env: envlib.EnvConfig = envlib.EnvConfig()
    adapt_episodes: tuple[int, ...] = (0, 1, 2, 5, 10)
    eval_episodes: int = 4
    embed_dim: int = 16
    hidden: int = 32
    ppo: ppolib.PPOConfig = ppolib.PPOConfig(num_updates=150, num_envs=32)
    ppo_scratch: ppolib.PPOConfig = ppolib.PPOConfig(num_envs=1, update_epochs=4, num_minibatches=1, lr=1e-2)
    dqn: dqnlib.DQNConfig = dqnlib.DQNConfig(num_iterations=100, num_envs=16)
    meta: mamllib.MetaRLConfig = mamllib.MetaRLConfig(num_iterations=150, meta_batch=16, inner_steps=2,
                                                       inner_episodes=1, query_episodes=4, inner_lr=1.0,
                                                       meta_lr=3e-3)
    online_rounds: int = 0

    def validate(self) -> None:
        if self.dataset not in ("ml-100k", "ml-1m", "synthetic"):
            raise ValueError(f"dataset must be ml-100k, ml-1m or synthetic, got {self.dataset!r}")
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; allowed: {list(ALL_METHODS)}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if any(n < 0 for n in self.adapt_episodes) or not self.adapt_episodes:
            raise ValueError(f"adapt_episodes must be non-negative integers, got {self.adapt_episodes}")
        if self.eval_episodes < 1:
            raise ValueError("eval_episodes must be >= 1")
        self.env.validate()


@dataclasses.dataclass
class BenchmarkHooks:
    """Optional host-side callbacks of :func:`run_benchmark` for run bookkeeping (metadata, metrics
    files, progress, sanity checks); they see intermediate results but do not change them. An
    exception raised by a hook stops the benchmark.

    ``on_simulator(seed, sim)``: after a seed's simulator is built.
    ``on_train(seed, method, metrics)``: after a training loop (``ppo``, ``dqn``, ``maml``, ``fomaml``,
    ``metasgd``); ``metrics`` maps names (``loss``, ``return``, ...) to numpy arrays over iterations.
    ``on_method(seed, method, curve)``: when a method's evaluation is done; ``curve`` is
    ``{metric: {n_adaptation_episodes: mean over test users}}`` as in the results.
    ``on_stage(seed, stage, seconds)``: after every timed stage (``train_ppo``, ``eval_bandits``, ...).
    """

    on_simulator: Callable | None = None
    on_train: Callable | None = None
    on_method: Callable | None = None
    on_stage: Callable | None = None


def build_simulator(config: BenchmarkConfig, seed: int) -> simlib.SimulatorData:
    """The simulator of one seed (fixed numbers of train/test users and items across seeds)."""
    if config.dataset == "synthetic":
        return simlib.synthetic_simulator(seed, config.n_train_users, config.n_test_users, config.n_items,
                                          env_config=config.env, reward=config.reward)
    from metarec.data import load_dataset, make_split

    data = load_dataset(config.dataset, data_dir=config.data_dir)
    split = make_split(data, seed, "melu")
    cold = split.sets["user_cold"]
    if cold.n_users < config.n_test_users:
        raise ValueError(f"seed {seed}: only {cold.n_users} user_cold users, --n_test_users={config.n_test_users}")
    cold = cold.select(np.arange(config.n_test_users))
    items = np.concatenate([cold.support_item, cold.query_item], 1)
    ratings = np.concatenate([cold.support_rating, cold.query_rating], 1)
    mask = np.concatenate([cold.support_mask, cold.query_mask], 1)
    tr = split.train_ratings
    n_avail = tr["user_id"].nunique()
    if n_avail < config.n_train_users:
        raise ValueError(f"seed {seed}: only {n_avail} training users, --n_train_users={config.n_train_users}")
    return simlib.movielens_simulator(tr, data.items, data.genres, items, ratings, mask, env_config=config.env,
                                      n_items=config.n_items, reward=config.reward, rating_scale=data.rating_scale,
                                      seed=seed, max_train_users=config.n_train_users)


class _Runner:
    """Holds the jitted functions (built once, reused for all seeds)."""

    def __init__(self, config: BenchmarkConfig):
        c = config
        self.c = c
        self.net = networks.make_item_scorer(c.n_items, c.env.history_len, c.embed_dim, c.hidden)
        self.n_max = max(c.adapt_episodes)
        self.ppo_train = jax.jit(ppolib.make_train(c.ppo, self.net))
        self.dqn_train = jax.jit(dqnlib.make_train(c.dqn, self.net))
        variants = {"maml": dict(), "fomaml": dict(first_order=True), "metasgd": dict(meta_sgd=True)}
        self.meta_cfg = {k: dataclasses.replace(c.meta, **v) for k, v in variants.items()}
        self.meta_train = {k: jax.jit(mamllib.make_meta_train(v, self.net)) for k, v in self.meta_cfg.items()}
        self.learner = mamllib.make_meta_rl(self.net, c.meta)
        net, n_max, ee = self.net, self.n_max, c.eval_episodes
        self.eval_meta = jax.jit(lambda k, mp, e: ev.evaluate_users(k, ev.meta_agent(net, self.learner, mp), e, n_max, ee))
        self.eval_sample = jax.jit(lambda k, p, e: ev.evaluate_users(k, ev.fixed_policy_agent(net, p), e, 0, ee))
        self.eval_greedy = jax.jit(lambda k, p, e: ev.evaluate_users(k, ev.fixed_policy_agent(net, p, True), e, 0, ee))
        self.eval_scratch = jax.jit(lambda k, e: ev.evaluate_users(k, ev.ppo_scratch_agent(net, c.ppo_scratch), e, n_max, ee))
        self.oracle = jax.jit(lambda k, e: ev.oracle_metrics(k, e, ee))
        self.bandit_names = [m for m in c.methods if m in BANDIT_METHODS]
        self.eval_bandits = jax.jit(
            lambda k, items, e: ev.evaluate_bandits(k, self.bandit_names, items, e, n_max, ee))
        self.online = jax.jit(lambda k, mp, e: online.run_online(k, net, self.learner, mp, e, c.online_rounds))

    def run_seed(self, seed: int, sim: simlib.SimulatorData, hooks: BenchmarkHooks | None = None) -> dict:
        c = self.c
        hooks = hooks or BenchmarkHooks()
        key = jax.random.PRNGKey(seed)
        ks = dict(zip(["ppo", "dqn", "maml", "eval", "oracle", "online"], jax.random.split(key, 6)))
        curves, timings, train_logs = {}, {}, {}
        want = set(c.methods)

        def timed(name, fn, *args):
            t = time.time()
            out = jax.block_until_ready(fn(*args))
            timings[name] = round(time.time() - t, 2)
            log.info("seed %d: %s done in %.1fs", seed, name, timings[name])
            if hooks.on_stage is not None:
                hooks.on_stage(seed, name, timings[name])
            return out

        def trained(name, out):
            if hooks.on_train is not None:
                hooks.on_train(seed, name, {k: np.asarray(v) for k, v in out["metrics"].items()})
            return out

        def add_curve(name, cur):
            per_n = {}
            for metric, arr in cur.items():
                arr = np.asarray(arr)  # [U, n_max+1] or [U, 1] for non-adapting policies
                per_n[metric] = {n: float(arr[:, min(n, arr.shape[1] - 1)].mean()) for n in c.adapt_episodes}
            curves[name] = per_n
            if hooks.on_method is not None:
                hooks.on_method(seed, name, per_n)

        ppo_params = None
        if want & {"ppo", "maml", "fomaml", "metasgd"}:
            out = trained("ppo", timed("train_ppo", self.ppo_train, ks["ppo"], sim.train))
            ppo_params = out["params"]
            train_logs["ppo_return"] = np.asarray(out["metrics"]["return"])
            if "ppo" in want:
                add_curve("ppo", timed("eval_ppo", self.eval_sample, ks["eval"], ppo_params, sim.test))
        if "dqn" in want:
            out = trained("dqn", timed("train_dqn", self.dqn_train, ks["dqn"], sim.train))
            train_logs["dqn_return"] = np.asarray(out["metrics"]["return"])
            add_curve("dqn", timed("eval_dqn", self.eval_greedy, ks["eval"], out["params"], sim.test))
        meta_params = {}
        for name in ("maml", "fomaml", "metasgd"):
            if name in want:
                out = trained(name, timed(f"train_{name}", self.meta_train[name], ks["maml"], sim.train, ppo_params))
                meta_params[name] = out["meta_params"]
                train_logs[f"{name}_post_return"] = np.asarray(out["metrics"]["post_return"])
                add_curve(name, timed(f"eval_{name}", self.eval_meta, ks["eval"], out["meta_params"], sim.test))
        if "ppo_scratch" in want:
            add_curve("ppo_scratch", timed("eval_ppo_scratch", self.eval_scratch, ks["eval"], sim.test))
        if self.bandit_names:
            items = bandits.item_inputs(sim.agent_item_factors, sim.agent_item_score, sim.popularity)
            for name, cur in timed("eval_bandits", self.eval_bandits, ks["eval"], items, sim.test).items():
                add_curve(name, cur)
        oracle = timed("oracle", self.oracle, ks["oracle"], sim.test)
        result = {"curves": curves, "oracle": {k: float(np.mean(v)) for k, v in oracle.items()},
                  "timings": timings, "train_logs": {k: v.tolist() for k, v in train_logs.items()}}
        if c.online_rounds > 0:
            src = "metasgd" if "metasgd" in meta_params else next(iter(meta_params), None)
            if src is not None:
                on = timed("online", self.online, ks["online"], meta_params[src], sim.test)
                result["online"] = {"policy": src, "round_ctr": np.asarray(on["round_ctr"]).tolist(),
                                    "final_running_ctr": float(np.asarray(on["running_ctr"])[-1])}
        return result


def run_benchmark(config: BenchmarkConfig, hooks: BenchmarkHooks | None = None) -> dict:
    """Run all seeds; returns the ``rl_results.json`` payload (without command/config). ``hooks``:
    optional :class:`BenchmarkHooks` (metadata, metrics, progress)."""
    config.validate()
    runner = _Runner(config)
    per_seed, reports = [], {}
    for seed in config.seeds:
        t = time.time()
        sim = build_simulator(config, seed)
        reports[seed] = {**sim.report, "build_s": round(time.time() - t, 2)}
        if hooks is not None and hooks.on_simulator is not None:
            hooks.on_simulator(seed, sim)
        per_seed.append(runner.run_seed(seed, sim, hooks))
    results = {}
    for name in config.methods:
        results[name] = {}
        for metric in ("ctr", "return", "regret"):
            results[name][metric] = {}
            for n in config.adapt_episodes:
                vals = np.array([s["curves"][name][metric][n] for s in per_seed])
                results[name][metric][str(n)] = {"mean": float(vals.mean()),
                                                 "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    oracle = {m: {"mean": float(np.mean([s["oracle"][m] for s in per_seed])),
                  "std": float(np.std([s["oracle"][m] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0}
              for m in ("ctr", "return")}
    out = {"results": results, "oracle_ctr": oracle["ctr"], "oracle_return": oracle["return"],
           "simulators": {str(k): v for k, v in reports.items()},
           "per_seed": [{"seed": s, "timings": r["timings"], "oracle": r["oracle"], "train_logs": r["train_logs"],
                         **({"online": r["online"]} if "online" in r else {})}
                        for s, r in zip(config.seeds, per_seed)]}
    return out


def format_table(payload: dict, metric: str = "ctr") -> str:
    """A text table ``method x n adaptation episodes`` of ``metric`` (mean ± std over seeds)."""
    res = payload["results"]
    ns = list(next(iter(res.values()))[metric].keys())
    head = f"{metric:<12}" + "".join(f"{'n=' + n:>16}" for n in ns)
    lines = [head, "-" * len(head)]
    for name, r in res.items():
        lines.append(f"{name:<12}" + "".join(f"{r[metric][n]['mean']:>9.3f} ± {r[metric][n]['std']:.3f}" for n in ns))
    if metric == "ctr":
        o = payload["oracle_ctr"]
        lines.append(f"{'oracle':<12}{o['mean']:>9.3f} ± {o['std']:.3f}")
    return "\n".join(lines)
