"""Federated meta-training rounds on the one resumable trainer, with communication accounting.

:func:`federated_train` runs rounds of a :func:`metarec.meta.federated.make_round` step. Round
``r`` (1, 2, ...):

1. draws the round's tasks, ``tasks_of(r)`` (one task per training user, drawn afresh each round,
   e.g. ``SeedData.train_tasks("resample")``: the user's data as it sits on the user's device);
2. samples clients (seeded by ``(sampler_seed, r)``): ``"uniform"``: ``max(1, round(p C))`` of the
   ``C`` clients without replacement (``p = 1``: all); ``"poisson"``: every client independently
   with probability ``p`` (all ``C`` slots are computed, the unsampled masked; what the DP
   accountant assumes). A sampled client drops out with probability ``drop_prob`` and is a
   straggler with probability ``straggler_prob`` (it completes only its first ``s`` local steps,
   ``s`` uniform in ``0 .. S-1``);
3. fills each sampled client's ``[S, B]`` task slots with its users' tasks in a seeded random order,
   each user at most once per round (a client with fewer than ``S B`` users leaves padding, weight
   0; with more, the first ``S B`` of the order are used);
4. runs the round; the parameters go down to every sampled client and a delta comes up from every
   responding one: ``bytes_down += n_sampled * P * 4``, ``bytes_up += n_responding * P * 4`` with
   ``P`` the number of meta-parameter values (float32).

Every ``eval_every`` rounds (a trainer piece, checkpointed) the validation users are scored (adapt
on their support sets, MAE on their query sets) and the best parameters by validation MAE are kept;
``patience`` evaluations without improvement stop the run early (0: never). A resumed run ends with
the same parameters and history (timings aside).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metarec.data.tasks import Task, check_finite_tasks, index_tasks
from metarec.meta.federated import message_bytes
from metarec.training import trainer
from metarec.training.checkpoint import Checkpointer, tree_digest
from metarec.training.meta_train import predict_tasks, score
from metarec.training.runlog import MetricsWriter

SAMPLING = ("uniform", "poisson")


@dataclasses.dataclass(frozen=True)
class FedSchedule:
    """How rounds are run (see the module docstring)."""

    rounds: int = 100
    participation: float = 1.0
    sampling: str = "uniform"
    local_steps: int = 1
    client_batch: int = 16
    eval_every: int = 5
    patience: int = 0
    drop_prob: float = 0.0
    straggler_prob: float = 0.0
    eval_chunk: int = 64
    k: int = 3

    def __post_init__(self):
        checks = (
            ("rounds", self.rounds >= 1, ">= 1"),
            ("participation", 0 < self.participation <= 1, "in (0, 1]"),
            ("sampling", self.sampling in SAMPLING, f"one of {', '.join(SAMPLING)}"),
            ("local_steps", self.local_steps >= 1, ">= 1"),
            ("client_batch", self.client_batch >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("patience", self.patience >= 0, ">= 0"),
            ("drop_prob", 0 <= self.drop_prob < 1, "in [0, 1)"),
            ("straggler_prob", 0 <= self.straggler_prob <= 1, "in [0, 1]"),
            ("eval_chunk", self.eval_chunk >= 1, ">= 1"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")


@dataclasses.dataclass
class FedResult:
    """The best meta-parameters by validation MAE and how they were found. ``history``: one record
    per evaluation (round, cumulative bytes, train loss, validation MAE, seconds)."""

    params: Any
    history: list[dict]
    best_round: int
    best_val_mae: float
    seconds: float
    rounds: int
    bytes_down: int
    bytes_up: int
    message_bytes: int
    resumed_from: int | None = None
    params_sha256: str = ""


def sample_round(
    rng: np.random.Generator, n_clients: int, s: FedSchedule
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(client ids [M], participating [M], steps_done [M])`` of one round (module docstring).
    ``participating`` is 0 for a dropped client, and for an unsampled slot under Poisson
    sampling (client id -1 there)."""
    if s.sampling == "uniform":
        m = max(1, int(round(s.participation * n_clients)))
        clients = np.sort(rng.choice(n_clients, m, replace=False))
        part = np.ones(m, np.float32)
    else:
        chosen = rng.random(n_clients) < s.participation
        clients = np.where(chosen, np.arange(n_clients), -1)
        part = chosen.astype(np.float32)
    dropped = rng.random(clients.size) < s.drop_prob
    straggle = rng.random(clients.size) < s.straggler_prob
    partial = rng.integers(0, s.local_steps, clients.size)
    part = np.where(dropped, 0.0, part).astype(np.float32)
    steps = np.where(straggle, partial, s.local_steps).astype(np.int32)
    return clients, part, steps


def client_slots(
    rng: np.random.Generator, client_rows: list[np.ndarray], clients: np.ndarray, s: FedSchedule
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [M, S, B], weights [M, S, B])``: each client's task rows in a seeded random order,
    each at most once, padding (row 0, weight 0) after them; an unsampled slot (-1) is all
    padding."""
    n_slots = s.local_steps * s.client_batch
    rows = np.zeros((clients.size, n_slots), np.int64)
    weights = np.zeros((clients.size, n_slots), np.float32)
    for i, c in enumerate(clients):
        if c < 0:
            continue
        r = rng.permutation(client_rows[c])[:n_slots]
        rows[i, : r.size], weights[i, : r.size] = r, 1.0
    shape = (clients.size, s.local_steps, s.client_batch)
    return rows.reshape(shape), weights.reshape(shape)


def federated_train(
    round_fn: Callable,
    eval_fn: Callable,
    init_meta_params,
    init_opt_state,
    tasks_of: Callable[[int], Task],
    partition: list[np.ndarray],
    val: Task,
    schedule: FedSchedule,
    key,
    scale,
    *,
    use_keys: bool = True,
    log_fn: Callable | None = None,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    metrics: MetricsWriter | None = None,
    unit: str = "federated",
) -> FedResult:
    """Run the rounds of ``schedule`` (module docstring); returns the best parameters by
    validation MAE. ``round_fn`` is :func:`metarec.meta.federated.make_round`'s, ``eval_fn``
    :func:`metarec.meta.step.make_eval_fn`'s; ``partition`` lists each client's user ids (every
    user of ``tasks_of(r)``'s tasks must be in one client); ``use_keys`` passes a PRNG key per
    round (split per task: feature dropout), as meta-training does."""
    s = schedule
    check_finite_tasks(val, f"{unit}: validation tasks")
    sampler_seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    msg = message_bytes(init_meta_params)
    n_clients = len(partition)
    ident = {"sampler_seed": sampler_seed, "n_clients": n_clients, "schedule": repr(s)}

    def rows_of(tasks: Task) -> list[np.ndarray]:
        row = {int(u): i for i, u in enumerate(np.asarray(tasks.user))}
        missing = [int(u) for part in partition for u in part if int(u) not in row]
        if missing:
            raise ValueError(f"{unit}: client user {missing[0]} has no task in this round's draw")
        if sum(p.size for p in partition) != len(row):
            raise ValueError(f"{unit}: the partition does not cover the {len(row)} task users")
        return [np.array([row[int(u)] for u in part], np.int64) for part in partition]

    def init() -> trainer.LoopState:
        arrays = {"params": init_meta_params, "opt_state": init_opt_state, "key": key}
        host = {
            "round": 0,
            "bytes_down": 0,
            "bytes_up": 0,
            "losses": [],
            "history": [],
            "best_val": None,
            "best_round": 0,
            "best_step": None,
            "unit": unit,
        }
        return trainer.LoopState(arrays, host)

    state, resumed_from = trainer.restore_or_init(
        init, checkpointer=checkpointer, resume=resume, ident=ident, what="federated run"
    )
    h = state.host
    best_params = state.arrays["params"]
    if resumed_from is not None:
        if h["best_step"] is not None and h["best_step"] != resumed_from:
            best_params = checkpointer.restore(h["best_step"], state.arrays)[0]["params"]
        if metrics is not None:
            metrics.truncate(unit, h["round"])
        if log_fn:
            log_fn(f"  {unit}: resumed from round {h['round']}")

    def piece(state: trainer.LoopState) -> tuple[trainer.LoopState, float | None]:
        nonlocal best_params
        h = state.host
        params, opt_state, k = (state.arrays[n] for n in ("params", "opt_state", "key"))
        end = min(h["round"] + s.eval_every, s.rounds)
        while h["round"] < end:
            r = h["round"] + 1
            tasks = tasks_of(r)
            check_finite_tasks(tasks, f"{unit}: tasks of round {r}")
            rng = np.random.default_rng([sampler_seed, r])
            clients, part, steps = sample_round(rng, n_clients, s)
            rows, weights = client_slots(rng, rows_of(tasks), clients, s)
            shape = rows.shape
            batch = jax.tree_util.tree_map(
                lambda a, shape=shape: jnp.asarray(a.reshape(shape + a.shape[1:])),
                index_tasks(tasks, rows.reshape(-1)),
            )
            k, sub = jax.random.split(k)
            k_tasks, k_noise = jax.random.split(sub)
            params, opt_state, m = round_fn(
                params,
                opt_state,
                batch,
                jnp.asarray(weights),
                jnp.asarray(part),
                jnp.asarray(steps),
                k_tasks if use_keys else None,
                k_noise,
            )
            if not bool(m["finite"]):
                raise trainer.non_finite_error(
                    f"{unit}: non-finite aggregate update at round {r} (loss "
                    f"{float(m['loss'])}); the round was refused",
                    r,
                    checkpointer,
                    unit="round",
                    hint="lower the server or local learning rate or set a clip norm",
                )
            h["round"] = r
            h["bytes_down"] += int((clients >= 0).sum()) * msg
            h["bytes_up"] += int(m["clients"]) * msg
            h["losses"].append(float(m["loss"]))
        out = predict_tasks(eval_fn, params, val, s.eval_chunk)
        val_mae = score(out["pred"], val, scale, s.k)["mae"]
        record = {
            "round": h["round"],
            "bytes_down": h["bytes_down"],
            "bytes_up": h["bytes_up"],
            "train_loss": float(np.mean(h["losses"])),
            "val_mae": val_mae,
            "seconds": state.seconds,
        }
        h["history"].append(record)
        if metrics is not None:
            metrics.write({"unit": unit, "kind": "eval", "step": h["round"], **record})
        if log_fn:
            log_fn(
                f"  {unit} round {h['round']:4d} loss {record['train_loss']:.4f} "
                f"val_mae {val_mae:.4f} MB {(h['bytes_down'] + h['bytes_up']) / 1e6:.1f}"
            )
        best = np.inf if h["best_val"] is None else h["best_val"]
        n_step = state.step + 1
        if val_mae < best:
            h["best_val"], h["best_round"], h["best_step"] = val_mae, h["round"], n_step
            best_params = params
        evals_since = (h["round"] - h["best_round"]) // s.eval_every
        state.done = h["round"] >= s.rounds or (s.patience > 0 and evals_since >= s.patience)
        h["losses"] = []
        state.arrays, state.step = {"params": params, "opt_state": opt_state, "key": k}, n_step
        return state, val_mae

    state = trainer.run(piece, state, checkpointer=checkpointer, ident=ident)
    h = state.host
    return FedResult(
        params=best_params,
        history=h["history"],
        best_round=h["best_round"],
        best_val_mae=float(np.inf if h["best_val"] is None else h["best_val"]),
        seconds=state.seconds,
        rounds=h["round"],
        bytes_down=h["bytes_down"],
        bytes_up=h["bytes_up"],
        message_bytes=msg,
        resumed_from=resumed_from,
        params_sha256=tree_digest(best_params),
    )
