"""Simulator throughput (see :mod:`benchmarks.rl_env.main`): the measurements and the run."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.meta_step import machine
from benchmarks.rl_env.numpy_env import run_random_episodes, users_of
from metarec.rl import bandits, networks
from metarec.rl import env as envlib
from metarec.rl import evaluate as ev
from metarec.rl import meta_bandit as mb
from metarec.rl import rollout as rolloutlib
from metarec.rl import simulator as simlib


def make_users(n_users: int, n_items: int, horizon: int, seed: int) -> envlib.EnvParams:
    """``n_users`` synthetic latent users (:func:`metarec.rl.simulator.synthetic_affinity`)."""
    aff, genres, _ = simlib.synthetic_affinity(seed, n_users, n_items, n_genres=18)
    return envlib.make_env_params(aff, genres, envlib.EnvConfig(horizon=horizon))


def random_act(key, state, obs):
    del state
    return jax.random.categorical(
        key, networks.masked_logits(jnp.zeros_like(obs["action_mask"]), obs["action_mask"])
    ).astype(jnp.int32), {}


#: the most users whose meta-bandit rollouts are vmapped at once: above 2048 users at once the
#: jitted rollout hangs in XLA:CPU (jaxlib 0.10.2, BUILD_NOTES), so larger batches run as
#: ``lax.map`` over vmapped chunks of this size
AGENT_CHUNK = 2048


def jax_throughput(
    envs: envlib.EnvParams, seed: int, min_time: float, agent=None, chunk: int | None = None
) -> dict:
    """Steps/s of one episode per user in one jitted call (random actions, or ``agent``'s): all
    users vmapped, or ``lax.map`` over vmapped chunks of ``chunk`` users."""
    n = envlib.num_users(envs)
    chunk = None if chunk is None or chunk >= n else chunk

    def episode(k, e):
        if agent is None:
            traj, _ = rolloutlib.rollout(k, e, random_act)
        else:
            traj, _ = rolloutlib.rollout(k, e, agent.act, agent.init(k), agent.step_update)
        return traj.alive.sum()

    def all_users(k, e):
        keys = jax.random.split(k, n)
        if chunk is None:
            return jax.vmap(episode)(keys, e).sum()
        return jax.lax.map(lambda a: episode(*a), (keys, e), batch_size=chunk).sum()

    f = jax.jit(all_users)
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    steps = int(f(key, envs))
    compile_s = time.perf_counter() - t0
    best = machine._timeit(lambda: f(key, envs).block_until_ready(), min_time)
    return {
        "users": n,
        "steps": steps,
        "seconds": best,
        "steps_per_s": steps / best,
        "first_call_s": round(compile_s, 3),
        "vmapped_at_once": chunk or n,
    }


def numpy_throughput(envs: envlib.EnvParams, seed: int, min_time: float) -> dict:
    n = envlib.num_users(envs)
    users = users_of(envs)
    best, steps, total, reps = np.inf, 0, 0.0, 0
    while reps < 2 or total < min_time:
        t0 = time.perf_counter()
        steps = run_random_episodes(users, seed + reps)
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return {"users": n, "steps": steps, "seconds": best, "steps_per_s": steps / best}


def run(
    workdir: str,
    command: str,
    users=(1, 64, 1024, 8192),
    numpy_users: int = 256,
    items: int = 100,
    horizon: int = 20,
    min_time: float = 1.0,
    seed: int = 0,
    log_fn=print,
) -> dict:
    """Measure, print and write ``rl_env.json`` to ``workdir``; returns its content."""
    users = [int(u) for u in users]
    info = machine.machine_info() | {"load_average": machine.load_average()}
    log_fn(
        f"command: {command}\nmachine: {info['cpu_model']}, {info['cpu_affinity']} cores, "
        f"backend {info['backend']}, jax {info['jax']}"
    )
    pool = make_users(max(users + [numpy_users]), items, horizon, seed)

    def sub(n):
        return envlib.index_params(pool, jnp.arange(n))

    ref = numpy_throughput(sub(numpy_users), seed, min_time)
    log_fn(f"numpy per-user loop: {ref['steps_per_s']:,.0f} steps/s ({ref['users']} users)")
    inputs = bandits.item_inputs(np.zeros((items, 8), np.float32), np.zeros(items), np.ones(items))
    agent = ev.meta_bandit_agent(
        mb.initial_params(inputs, mb.MetaBanditConfig()), pool.item_genres[0]
    )
    rows = []
    for n in users:
        env_row = jax_throughput(sub(n), seed, min_time)
        pol_row = jax_throughput(sub(n), seed, min_time, agent, chunk=AGENT_CHUNK)
        row = {
            "users": n,
            "env": env_row,
            "metabandit_rollout": pol_row,
            "env_vs_numpy": env_row["steps_per_s"] / ref["steps_per_s"],
            "rollout_vs_numpy": pol_row["steps_per_s"] / ref["steps_per_s"],
        }
        rows.append(row)
        log_fn(
            f"{n:>6} users: simulator {env_row['steps_per_s']:>14,.0f} steps/s "
            f"({row['env_vs_numpy']:,.1f}x numpy); metabandit rollouts "
            f"{pol_row['steps_per_s']:>12,.0f} steps/s ({row['rollout_vs_numpy']:,.1f}x)"
        )
    out = {"command": command, "machine": info, "items": items, "horizon": horizon}
    out |= {"numpy": ref, "rows": rows}
    path = os.path.join(workdir, "rl_env.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    log_fn(f"wrote {path}")
    return out
