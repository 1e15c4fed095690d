"""The per-seed work of the meta-RL experiment: simulator, training loops, evaluation.

For every seed: build the simulator (MovieLens: train users = the protocol's warm-train users, test
users = its ``user_cold`` users, seed-dependent; or the synthetic latent-user simulator), train the
non-meta agents (PPO and DQN on all training users), meta-train MAML / FOMAML / Meta-SGD
(warm-started from the PPO policy), then evaluate every method on the held-out users with
:func:`metarec.rl.evaluate.adaptation_curve` after ``n`` adaptation episodes. The methods are the
names of :data:`experiments.meta_rl.settings.METHODS`.

All jitted functions take the environments as arguments and every seed has the same numbers of
users and items, so each is compiled once for all seeds.

Training loops run in pieces of ``checkpoint_every`` iterations (:mod:`metarec.rl.loop`); with a
workdir (:class:`RunContext`) every piece is checkpointed, every finished (seed, unit) saved, and an
interrupted run resumes bit-identically. A non-finite training metric stops the run with
:class:`metarec.training.trainer.NonFiniteLossError` naming seed, method and iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from experiments.meta_rl.settings import BANDIT_METHODS, META_METHODS, library_configs
from experiments.meta_rl.validation import VAL_STREAM, validation_split  # noqa: F401 (re-exported)
from metarec import data as mdata
from metarec.rl import bandits, loop, networks, online
from metarec.rl import dqn as dqnlib
from metarec.rl import evaluate as ev
from metarec.rl import maml as mamllib
from metarec.rl import meta_bandit as mblib
from metarec.rl import ppo as ppolib
from metarec.rl import rl2 as rl2lib
from metarec.rl import simulator as simlib
from metarec.training.checkpoint import Checkpointer, tree_digest
from metarec.training.runlog import read_json, write_json_atomic

log = logging.getLogger("metarec.rl")
#: what every method is given (the results header states it)
TRAINING_DATA = (
    "every method: the training users' ratings (the recommender-side MF behind the bandits' item "
    "features and the meta-learned bandit's starting point) and, for trained policies (PPO, DQN, "
    "MAML family, metabandit), episodes with the training users' simulators; held-out users are "
    "met only through the adaptation episodes, the same budget for every method"
)
#: per-method metrics of the results, each per number of adaptation episodes
METRICS = ("ctr", "return", "regret", "cum_regret")


def metrics_of(spec) -> tuple[str, ...]:
    """:data:`METRICS`, and the slate nDCG when a step shows a slate (``env.slate_size > 1``)."""
    return METRICS + (("ndcg",) if spec.env.slate_size > 1 else ())


@dataclasses.dataclass
class Hooks:
    """Optional host-side callbacks of :func:`run_seeds` for run bookkeeping (metadata, metrics
    files, progress, sanity checks); they see intermediate results but do not change them. An
    exception raised by a hook stops the run.

    ``on_simulator(seed, sim)``: after a seed's simulator is built.
    ``on_unit_start(seed, method, start)``: a training loop (``ppo``, ``dqn``, ``maml``,
    ``fomaml``, ``metasgd``) starts, or continues from its checkpoint at iteration ``start``:
    anything logged for it after ``start`` by an earlier, killed run is stale.
    ``on_train(seed, method, metrics, start=0)``: after each checkpointed piece of a training loop;
    ``metrics`` maps names (``loss``, ``return``, ...) to finite numpy arrays over its iterations,
    the first being iteration ``start + 1``.
    ``on_method(seed, method, curve)``: when a method's evaluation is done; ``curve`` is
    ``{metric: {n_adaptation_episodes: mean over test users}}`` as in the results.
    ``on_unit_read(seed, method, curve)``: a method finished by an earlier run was read back
    (resume).
    ``on_stage(seed, stage, seconds)``: after every timed stage (``train_ppo``, ``eval_bandits``,
    ...).
    """

    on_simulator: Callable | None = None
    on_train: Callable | None = None
    on_method: Callable | None = None
    on_stage: Callable | None = None
    on_unit_start: Callable | None = None
    on_unit_read: Callable | None = None


#: where the synthetic simulator's validation users start (disjoint from train and test users)
SYNTHETIC_VAL_FIRST = 1_000_000
HELD_OUT = ("test", "val")


def build_simulator(spec, seed: int, held_out: str = "test") -> simlib.SimulatorData:
    """The simulator of one seed (fixed numbers of train/held-out users and items across seeds).

    ``held_out="test"``: the held-out users are the first ``n_test_users`` ``user_cold`` users.
    ``held_out="val"`` (the tuning path): ``n_val_users`` of the *training* users instead
    (:func:`validation_split`), left out of the simulator's and the agents' training data; the
    test users' sets are never read.
    """
    if held_out not in HELD_OUT:
        raise ValueError(f"held_out must be one of {HELD_OUT}, got {held_out!r}")
    env = library_configs(spec).env
    n_held = spec.n_test_users if held_out == "test" else spec.n_val_users
    if spec.dataset == "synthetic":
        return simlib.synthetic_simulator(
            seed,
            spec.n_train_users,
            n_held,
            spec.n_items,
            env_config=env,
            reward=spec.reward,
            held_out_first=None if held_out == "test" else SYNTHETIC_VAL_FIRST,
        )
    data = mdata.load_dataset(spec.dataset, data_dir=spec.data_dir)
    split = mdata.make_split(data, seed, "melu")
    tr = split.train_ratings
    if held_out == "val":
        # at most as many ratings as the widest test user folds in (melu: 89 support + 10 query)
        tr, items, ratings, mask = validation_split(tr, n_held, seed, max_ratings=99)
    else:
        cold = split.sets["user_cold"]
        if cold.n_users < n_held:
            raise ValueError(
                f"seed {seed}: only {cold.n_users} user_cold users, --config.n_test_users={n_held}"
            )
        cold = cold.select(np.arange(n_held))
        items = np.concatenate([cold.support_item, cold.query_item], 1)
        ratings = np.concatenate([cold.support_rating, cold.query_rating], 1)
        mask = np.concatenate([cold.support_mask, cold.query_mask], 1)
    n_avail = tr["user_id"].nunique()
    if n_avail < spec.n_train_users:
        raise ValueError(
            f"seed {seed}: only {n_avail} training users, "
            f"--config.n_train_users={spec.n_train_users}"
        )
    return simlib.movielens_simulator(
        tr,
        data.items,
        data.genres,
        items,
        ratings,
        mask,
        env_config=env,
        n_items=spec.n_items,
        reward=spec.reward,
        rating_scale=data.rating_scale,
        seed=seed,
        max_train_users=spec.n_train_users,
    )


def simulator_digest(sim: simlib.SimulatorData) -> str:
    """SHA-256 of a seed's simulator (environments, catalogue, popularity): saved with every unit
    and checkpoint so that ``resume`` refuses state computed on other data."""
    tree = {
        "train": sim.train,
        "test": sim.test,
        "item_ids": sim.item_ids,
        "popularity": sim.popularity,
    }
    return tree_digest(tree)


@dataclasses.dataclass
class RunContext:
    """Where and how :func:`run_seeds` keeps its state (``workdir`` None: nothing is written).

    With a ``workdir``, every training loop (``ppo`` — also when it is only the meta-learners'
    warm start —, ``dqn``, ``maml``, ``fomaml``, ``metasgd``) saves its full state (params,
    optimizer state, PRNG key, DQN target network and replay buffer; step = iterations done,
    metrics so far) every
    ``checkpoint_every`` iterations under ``checkpoints/seed<s>/<method>``, keeping the newest
    ``keep_checkpoints`` (there is no validation metric during RL training, so no best-by-metric
    one); the newest is the final state. Every finished unit — a method's training and evaluation,
    the bandits', ``oracle``, ``online`` — is saved to ``units/seed<s>/<unit>.json``. ``resume``:
    finished units are read back instead of recomputed, an unfinished training loop continues from
    its newest checkpoint; the results are bit-identical to an uninterrupted run on CPU.
    ``checkpoint_every`` also sets the length of the jitted training pieces when nothing is written
    (the numbers do not depend on it).
    """

    workdir: str | None = None
    resume: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2


def unit_paths(workdir: str, seed: int, unit: str) -> tuple[str, str]:
    """``(checkpoint directory, result file)`` of one (seed, unit) inside ``workdir``."""
    return (
        os.path.join(workdir, "checkpoints", f"seed{seed}", unit),
        os.path.join(workdir, "units", f"seed{seed}", f"{unit}.json"),
    )


class _UnitStore:
    """The files of one seed's units (see :class:`RunContext`)."""

    def __init__(self, ctx: RunContext, seed: int, sim_sha256: str):
        self.ctx, self.seed, self.sim_sha256 = ctx, seed, sim_sha256

    def load(self, unit: str) -> dict | None:
        if self.ctx.workdir is None or not self.ctx.resume:
            return None
        path = unit_paths(self.ctx.workdir, self.seed, unit)[1]
        if not os.path.exists(path):
            return None
        rec = read_json(path)
        if rec.get("simulator_sha256") != self.sim_sha256:
            raise ValueError(
                f"{path} was computed on another simulator (data or settings changed since the "
                "run started); use a fresh --workdir"
            )
        if "curve" in rec:  # JSON object keys are strings; the numbers of episodes are ints
            rec["curve"] = {
                m: {int(n): v for n, v in per_n.items()} for m, per_n in rec["curve"].items()
            }
        return rec

    def save(self, unit: str, rec: dict) -> None:
        if self.ctx.workdir is not None:
            head = {"seed": self.seed, "unit": unit, "simulator_sha256": self.sim_sha256}
            write_json_atomic(unit_paths(self.ctx.workdir, self.seed, unit)[1], head | rec)

    def checkpointer(self, unit: str) -> Checkpointer | contextlib.nullcontext:
        if self.ctx.workdir is None:
            return contextlib.nullcontext()
        ckpt_dir = unit_paths(self.ctx.workdir, self.seed, unit)[0]
        ck = Checkpointer(ckpt_dir, keep_last=self.ctx.keep_checkpoints, keep_best=0)
        if ck.latest_step() is not None and not self.ctx.resume:
            ck.close()
            raise ValueError(
                f"{ckpt_dir} already holds checkpoints; pass --resume to continue or use a fresh "
                "--workdir"
            )
        return ck


#: in-context agents (state updated every step, meta-trained by REINFORCE): module, key stream
IN_CONTEXT = {"metabandit": (mblib, 7), "rl2": (rl2lib, 8)}


@functools.partial(jax.jit, static_argnums=(4, 5, 6))  # the constants are arguments: one program
def _eval_bandits(key, hp, items, envs, names, n_max, eval_episodes):
    return ev.evaluate_bandits(key, names, items, envs, n_max, eval_episodes, hp)


class _Runner:
    """Holds the jitted functions (built once, reused for all seeds)."""

    def __init__(self, spec):
        self.c = c = spec
        lib = self.lib = library_configs(spec)
        self.net = networks.make_item_scorer(c.n_items, lib.env.history_len, c.embed_dim, c.hidden)
        self.n_max = max(c.adapt_episodes)
        variants = {"maml": {}, "fomaml": {"first_order": True}, "metasgd": {"meta_sgd": True}}
        self.meta_cfg = {k: dataclasses.replace(lib.meta, **v) for k, v in variants.items()}
        self.trainers = {
            "ppo": ppolib.make_trainer(lib.ppo, self.net),
            "dqn": dqnlib.make_trainer(lib.dqn, self.net),
        }
        for k, v in self.meta_cfg.items():
            self.trainers[k] = mamllib.make_meta_trainer(v, self.net)
        self.trainers["metabandit"] = mblib.make_trainer(lib.metabandit)
        self.trainers["rl2"] = rl2lib.make_trainer(lib.rl2)
        self.init = {k: jax.jit(t.init) for k, t in self.trainers.items()}
        self.run = {k: jax.jit(t.run, static_argnames="length") for k, t in self.trainers.items()}
        self.learner = mamllib.make_meta_rl(self.net, lib.meta)
        net, n_max, ee = self.net, self.n_max, c.eval_episodes
        k = lib.env.slate_size

        def users(key, agent, envs, n):
            return ev.evaluate_users(key, agent, envs, n, ee)

        self.eval_meta = jax.jit(
            lambda key, mp, e: users(key, ev.meta_agent(net, self.learner, mp, k), e, n_max)
        )
        self.eval_sample = jax.jit(
            lambda key, p, e: users(key, ev.fixed_policy_agent(net, p, slate_size=k), e, 0)
        )
        self.eval_greedy = jax.jit(
            lambda key, p, e: users(key, ev.fixed_policy_agent(net, p, True, k), e, 0)
        )
        self.eval_scratch = jax.jit(
            lambda key, e: users(key, ev.ppo_scratch_agent(net, lib.ppo_scratch, k), e, n_max)
        )
        self.eval_in_context = {
            name: jax.jit(
                lambda key, p, e, fns=mod.make_agent_fns: users(
                    key, ev.in_context_agent(fns, p, e.item_genres[0], k), e, n_max
                )
            )
            for name, (mod, _) in IN_CONTEXT.items()
        }
        self.oracle = jax.jit(lambda k, e: ev.oracle_metrics(k, e, ee))
        self.bandit_names = tuple(m for m in c.methods if m in BANDIT_METHODS)
        hp = bandits.hyper_params(self.bandit_names, lib.bandits)
        self.eval_bandits = lambda k, items, e: _eval_bandits(
            k, hp, items, e, self.bandit_names, n_max, ee
        )
        self.online = jax.jit(
            lambda k, mp, e: online.run_online(k, net, self.learner, mp, e, c.online_rounds)
        )

    def run_seed(
        self,
        seed: int,
        sim: simlib.SimulatorData,
        hooks: Hooks | None = None,
        ctx: RunContext | None = None,
    ) -> dict:
        c = self.c
        hooks = hooks or Hooks()
        ctx = ctx or RunContext()
        store = _UnitStore(ctx, seed, simulator_digest(sim))
        key = jax.random.PRNGKey(seed)
        ks = dict(zip(["ppo", "dqn", "maml", "eval", "oracle", "online"], jax.random.split(key, 6)))
        curves, timings, train_logs, digests, resumed, loops = {}, {}, {}, {}, [], {}
        want = set(c.methods)
        metas = [m for m in META_METHODS if m in want]

        def bandit_items():
            return bandits.item_inputs(sim.agent_item_factors, sim.agent_item_score, sim.popularity)

        def stage_done(name, seconds):
            timings[name] = round(seconds, 2)
            log.info("seed %d: %s done in %.1fs", seed, name, timings[name])
            if hooks.on_stage is not None:
                hooks.on_stage(seed, name, timings[name])

        def timed(name, fn, *args):
            t = time.time()
            out = jax.block_until_ready(fn(*args))
            stage_done(name, time.time() - t)
            return out

        def add_curve(name, cur):
            per_n = {}
            for metric, arr in cur.items():
                arr = np.asarray(arr)  # [U, n_max+1] or [U, 1] for non-adapting policies
                per_n[metric] = {
                    n: float(arr[:, min(n, arr.shape[1] - 1)].mean()) for n in c.adapt_episodes
                }
            # regret against the oracle summed over the episodes 0..n (every n is evaluated)
            regret = np.asarray(cur["regret"])
            per_ep = np.broadcast_to(regret, (regret.shape[0], self.n_max + 1)).mean(0)
            per_n["cum_regret"] = {n: float(per_ep[: n + 1].sum()) for n in c.adapt_episodes}
            curves[name] = per_n
            if hooks.on_method is not None:
                hooks.on_method(seed, name, per_n)
            return per_n

        def unit(name, compute):
            """A finished unit's record read back (resume), or ``compute()``'s saved."""
            rec = store.load(name)
            if rec is None:
                rec = compute()
                store.save(name, rec)
            else:
                resumed.append(name)
                log.info("seed %d: %s finished earlier, read back", seed, name)
                timings.update(rec.get("timings", {}))
                if "curve" in rec:
                    curves[name] = rec["curve"]
                    if hooks.on_unit_read is not None:
                        hooks.on_unit_read(seed, name, rec["curve"])
            train_logs.update(rec.get("train_logs", {}))
            if "params_sha256" in rec:
                digests[name] = rec["params_sha256"]
            return rec

        def train(name):
            """The final state of training loop ``name``: trained, continued from its newest
            checkpoint, or (finished earlier) restored."""
            if name in loops:
                return loops[name]

            def init(warm=True):
                if name == "ppo":
                    return self.init["ppo"](ks["ppo"])
                if name == "dqn":
                    return self.init["dqn"](ks["dqn"], sim.train)
                if name in IN_CONTEXT:  # start from the bandit family's features and prior
                    mod, stream = IN_CONTEXT[name]
                    k_ic = jax.random.fold_in(key, stream)  # (a split would move every other key)
                    cfg = getattr(self.lib, name)
                    start = mod.initial_params(bandit_items(), cfg, jax.random.fold_in(k_ic, 1))
                    return self.init[name](k_ic, sim.train, start)
                # meta-learners start from the PPO policy (trained, or restored, for a fresh start)
                warm_params = train("ppo").state["params"] if warm else None
                return self.init[name](ks["maml"], sim.train, warm_params)

            with store.checkpointer(name) as ck:
                start = ck.latest_step() if ck is not None and ctx.resume else None
                if hooks.on_unit_start is not None:
                    hooks.on_unit_start(seed, name, start or 0)
                on_chunk = None
                if hooks.on_train is not None:

                    def on_chunk(i, m):
                        hooks.on_train(seed, name, m, start=i)

                out = loop.train_checkpointed(
                    self.run[name],
                    init,
                    sim.train,
                    self.trainers[name].num_iterations,
                    every=ctx.checkpoint_every,
                    checkpointer=ck,
                    resume=ctx.resume,
                    name=f"seed {seed}, method {name}",
                    on_chunk=on_chunk,
                    like=jax.eval_shape(lambda: init(False)),
                    meta={"unit": f"seed{seed}/{name}", "simulator_sha256": store.sim_sha256},
                )
            n_iter = self.trainers[name].num_iterations
            if out.resumed_from is not None and out.resumed_from < n_iter:
                resumed.append(f"{name}@{out.resumed_from}")
                log.info(
                    "seed %d: %s continued from its checkpoint at iteration %d",
                    seed,
                    name,
                    out.resumed_from,
                )
            stage_done(f"train_{name}", out.seconds)
            loops[name] = out
            return out

        def trained(name, evaluate=None):
            def compute():
                out = train(name)
                # the training curve kept in the results
                curve = (
                    "ctr" if name in IN_CONTEXT else ("post_return" if name in metas else "return")
                )
                rec = {
                    "train_logs": {f"{name}_{curve}": out.metrics[curve].tolist()},
                    "params_sha256": tree_digest(out.state["params"]),
                }
                if evaluate is not None:
                    rec["curve"] = add_curve(name, evaluate(out.state["params"]))
                own = (f"train_{name}", f"eval_{name}")
                rec["timings"] = {k: v for k, v in timings.items() if k in own}
                return rec

            return unit(name, compute)

        if want & {"ppo", *META_METHODS}:

            def eval_ppo(p):
                return timed("eval_ppo", self.eval_sample, ks["eval"], p, sim.test)

            trained("ppo", eval_ppo if "ppo" in want else None)
        if "dqn" in want:
            trained("dqn", lambda p: timed("eval_dqn", self.eval_greedy, ks["eval"], p, sim.test))
        for name in metas:

            def eval_meta(p, name=name):
                return timed(f"eval_{name}", self.eval_meta, ks["eval"], p, sim.test)

            trained(name, eval_meta)
        for name in (m for m in IN_CONTEXT if m in want):

            def eval_in_context(p, name=name):
                return timed(f"eval_{name}", self.eval_in_context[name], ks["eval"], p, sim.test)

            trained(name, eval_in_context)
        if "ppo_scratch" in want:

            def scratch():
                cur = timed("eval_ppo_scratch", self.eval_scratch, ks["eval"], sim.test)
                return {
                    "curve": add_curve("ppo_scratch", cur),
                    "timings": {"eval_ppo_scratch": timings["eval_ppo_scratch"]},
                }

            unit("ppo_scratch", scratch)
        if self.bandit_names:
            recs = [store.load(n) for n in self.bandit_names]
            if any(r is None for r in recs):  # evaluated together: all again
                out = timed("eval_bandits", self.eval_bandits, ks["eval"], bandit_items(), sim.test)
                for name in self.bandit_names:
                    rec = {
                        "curve": add_curve(name, out[name]),
                        "timings": {"eval_bandits": timings["eval_bandits"]},
                    }
                    store.save(name, rec)
            else:
                for name in self.bandit_names:
                    unit(name, None)

        def run_oracle():
            out = timed("oracle", self.oracle, ks["oracle"], sim.test)
            return {
                "oracle": {k: float(np.mean(v)) for k, v in out.items()},
                "timings": {"oracle": timings["oracle"]},
            }

        rec = unit("oracle", run_oracle)
        result = {
            "curves": curves,
            "oracle": rec["oracle"],
            "timings": timings,
            "train_logs": train_logs,
            "params_sha256": digests,
            "resumed": resumed,
        }
        if c.online_rounds > 0:
            src = "metasgd" if "metasgd" in metas else next(iter(metas), None)
            if src is not None:

                def run_online():
                    params = train(src).state["params"]
                    on = timed("online", self.online, ks["online"], params, sim.test)
                    return {
                        "online": {
                            "policy": src,
                            "round_ctr": np.asarray(on["round_ctr"]).tolist(),
                            "final_running_ctr": float(np.asarray(on["running_ctr"])[-1]),
                        },
                        "timings": {"online": timings["online"]},
                    }

                result["online"] = unit("online", run_online)["online"]
        return result


def _mean_std(values) -> dict:
    vals = np.asarray(values)
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}


def run_on_simulators(spec, sims: dict) -> dict:
    """``{seed: run_seed's result}`` of a resolved config on given simulators (``{seed:
    SimulatorData}``, e.g. the validation ones of :func:`build_simulator`); nothing is written."""
    runner = _Runner(spec)
    return {seed: runner.run_seed(seed, sim) for seed, sim in sims.items()}


def run_seeds(spec, hooks: Hooks | None = None, ctx: RunContext | None = None) -> dict:
    """Run all seeds of a resolved config (:func:`~experiments.meta_rl.settings.resolve`); returns
    the ``rl_results.json`` payload (without command/config). ``hooks``: optional :class:`Hooks`
    (metadata, metrics, progress); ``ctx``: checkpoints, unit files and resume
    (:class:`RunContext`; default: nothing written)."""
    ctx = ctx or RunContext()
    runner = _Runner(spec)
    per_seed, reports = [], {}
    for seed in spec.seeds:
        t = time.time()
        sim = build_simulator(spec, seed)
        reports[seed] = {**sim.report, "build_s": round(time.time() - t, 2)}
        if hooks is not None and hooks.on_simulator is not None:
            hooks.on_simulator(seed, sim)
        per_seed.append(runner.run_seed(seed, sim, hooks, ctx))
    results = {}
    for name in spec.methods:
        results[name] = {}
        for metric in metrics_of(spec):
            results[name][metric] = {
                str(n): _mean_std([s["curves"][name][metric][n] for s in per_seed])
                for n in spec.adapt_episodes
            }
    oracle = {m: _mean_std([s["oracle"][m] for s in per_seed]) for m in ("ctr", "return")}
    seeds_out = []
    for s, r in zip(spec.seeds, per_seed):
        keys = ("timings", "oracle", "train_logs", "params_sha256", "resumed", "online")
        seeds_out.append({"seed": s, **{k: r[k] for k in keys if k in r}})
    return {
        "results": results,
        "oracle_ctr": oracle["ctr"],
        "oracle_return": oracle["return"],
        "simulators": {str(k): v for k, v in reports.items()},
        "recommended": spec.recommended,
        "training_data": TRAINING_DATA,
        "per_seed": seeds_out,
    }
