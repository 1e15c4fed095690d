"""Model selection on validation users only: the stage that writes the cold-start defaults.

Every candidate is meta-trained on the training ratings of the given seeds and scored on those
seeds' validation users (adapt on their support sets, predict their query sets), exactly as early
stopping does, and once more on new items (``SeedData.val_new``: a ``val_new_items`` fraction
of the items, random or the newest (``val_hold_out``, ``val_whole_years``), loses every
training rating, so they are out of vocabulary as a new item is, and the training users'
ratings of them make tasks as new items' ratings make item_cold's), the stand-in for the
item-cold scenarios, and on new users
(``SeedData.val_cold``: a ``val_cold_users`` fraction of the other training users loses every
training rating and is scored as user_cold's users are; see
``experiments/coldstart/tuning_sets.py``). The tuning
path cannot see a test scenario: it builds its data with ``prepare_seed(..., test=False)``, which
encodes no test task (the split knows which users are test users only to leave them out).

* :func:`search` — optuna's TPE sampler (seeded, so a rerun proposes the same points) over a
  space of config fields for one method; :func:`grid_search` — every point of a small grid.
* :func:`select` — tune several methods and name the recommended one: the lowest
  :func:`selection_objective`. :func:`main` writes ``tune.json`` and the config file the
  cold-start experiment reads (``experiments/coldstart/configs/tuned.json``).

Search spaces and the optuna study live in :mod:`experiments.tune.spaces`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from experiments.coldstart import finetune
from experiments.coldstart.build import (
    Compiled,
    SeedData,
    baseline_predictions,
    method_config,
    prepare_seed,
    seed_workers,
    validate_config,
)
from experiments.coldstart.tables import deployed, fold_tables, initial_params
from experiments.tune.noise import selection_noise
from experiments.tune.spaces import parse_space, run_study, start_values
from metarec import data as mdata
from metarec.meta import LEARNERS
from metarec.training.meta_train import (
    calibrate_inner_rates,
    evaluate,
    meta_train,
    new_item_params,
    predict_tasks,
)
from metarec.training.processes import WorkerGroup
from metarec.training.runlog import write_json_atomic
from metarec.training.trainer import NonFiniteLossError

DIVERGED = 10.0  # the objective of a point whose meta-training diverged
# fields that act after meta-training: points that differ only in them share one training
AFTER_TRAINING = ("new_item_step_scale",)
TRAINED_KEEP = 4  # meta-training results kept per process (see `_meta_trained`)
_trained: dict = {}


def _meta_trained(sd: SeedData, c, algo: str, seed: int, train: Callable):
    """``train()`` (meta-training ``sd``'s model under ``c``), or its result for an earlier point
    whose config differs from ``c`` only in :data:`AFTER_TRAINING` fields on this same ``sd``,
    ``algo`` and ``seed`` (deterministic, so the same): a grid over such a field (the tune
    stages' last step) trains once per model, not once per trial. The last :data:`TRAINED_KEEP`
    are kept, each with its ``sd``, so no other object can reuse an ``id`` in a key meanwhile."""
    fields = {k: v for k, v in c.to_dict().items() if k not in AFTER_TRAINING}
    key = (id(sd), algo, seed, repr(sorted(fields.items())))
    if key not in _trained:
        while len(_trained) >= TRAINED_KEEP:
            _trained.pop(next(iter(_trained)))
        _trained[key] = (sd, train())
    return _trained[key][1]


def prepare(cfg, seeds, data: mdata.RatingsData | None = None) -> tuple[mdata.RatingsData, dict]:
    """The dataset and, per seed, its training/validation data with no test task encoded
    (:func:`prepare_tuning_seed`)."""
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    return data, {seed: prepare_tuning_seed(data, seed, cfg) for seed in seeds}


@contextlib.contextmanager
def prepared_seeds(cfg, seeds, data: mdata.RatingsData | None = None, log_fn: Callable = print):
    """``(data, prepared)``: :func:`prepare`'s, or, with ``cfg.seed_workers`` > 1 on the CPU
    (:func:`~experiments.coldstart.build.seed_workers`), the seeds prepared in worker processes
    (:class:`SeedWorkers`, ended on exit)."""
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    workers = seed_workers(cfg, len(seeds))
    if workers == 1:
        yield prepare(cfg, seeds, data)
        return
    with SeedWorkers(cfg, seeds, data, workers, log_fn) as group:
        yield data, group


def prepare_tuning_seed(data: mdata.RatingsData, seed: int, cfg) -> SeedData:
    """One seed's tuning data (``prepare_seed(..., test=False)``). With ``cfg.val_new_model =
    "separate"`` and a new-item stand-in, that data (its items held out, the validation users'
    support fitted as in evaluation) becomes ``val_new_data`` of the data with no item held out,
    whose validation and cold users keep every training item, as the test scenarios' users do."""
    if cfg.get("val_new_model", "shared") == "shared" or not cfg.val_new_items:
        return prepare_seed(data, seed, cfg, test=False)
    every_item, new_item = (ml_collections.ConfigDict(cfg.to_dict()) for _ in range(2))
    every_item.val_new_items, new_item.val_support_in_fit = 0.0, True
    sd = prepare_seed(data, seed, new_item, test=False)
    return dataclasses.replace(prepare_seed(data, seed, every_item, test=False), val_new_data=sd)


def _prepared_state(seed: int, *, cfg, data, log_fn=None, metrics=None) -> tuple:
    """A :class:`SeedWorkers` worker's state for ``seed``: ``(seed, SeedData, data)``."""
    return seed, prepare_tuning_seed(data, seed, cfg), data


def _has_cold(state, *, log_fn=None, metrics=None) -> bool:
    return state[1].val_cold is not None


class SeedWorkers(WorkerGroup):
    """The seeds' tuning data prepared once, each in a worker process that then trains and scores
    every trial's model on it (:func:`evaluate_point`, :func:`baselines_on_validation`): the
    seeds of a trial at once, with the same numbers as one process (the same programs on the
    same inputs). A prepared seed holds closures, so it stays in its worker."""

    def __init__(self, cfg, seeds, data: mdata.RatingsData, workers: int, log_fn=print):
        setup = functools.partial(_prepared_state, cfg=cfg, data=data)
        super().__init__(setup, seeds, workers, log_fn=log_fn)
        self.has_cold = any(self.map(_has_cold))


def _per_seed(prepared, data, fn: Callable, *args, **here) -> list:
    """``fn((seed, SeedData, data), *args)`` for every prepared seed, in seed order: in the seeds'
    :class:`SeedWorkers` workers, or here one after another with the keyword arguments ``here``
    (e.g. compiled functions the seeds share)."""
    if isinstance(prepared, SeedWorkers):
        return prepared.map(fn, *args)
    return [fn((seed, sd, data), *args, **here) for seed, sd in prepared.items()]


def stand_ins(prepared) -> tuple[str, ...]:
    """The stand-in sets every row scores besides the validation users: ``val_new`` (NaN where a
    seed has none) and ``val_cold`` where the seeds have one."""
    if isinstance(prepared, SeedWorkers):
        cold = prepared.has_cold
    else:
        cold = any(sd.val_cold is not None for sd in prepared.values())
    return ("val_new", "val_cold") if cold else ("val_new",)


def _train(c, fns: Compiled, algo: str, sd: SeedData, seed: int, data):
    """``((params, new-item params), eval_fn, best epoch, step scale)``: ``sd``'s model
    meta-trained with early stopping on its validation users, then, as the cold-start experiment
    does, Meta-SGD's learned rates scaled by those users' choice (and, with
    ``new_item_step_scale`` >= 0, by that scale for new items; otherwise None)."""
    spec = sd.encoder.spec
    fns.use_seed(seed).load_pretrained(sd.encoder, seed)
    init_fn, _ = fns.model(spec)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
    deploy, train_eval = deployed(sd, c, seed), fns.eval(spec, algo)

    def eval_fn(meta, tasks):
        return train_eval(deploy(meta), tasks)

    def train():
        return meta_train(
            fns.learner(spec, algo),
            fns.step(spec, algo),
            eval_fn,
            initial_params(init_fn, k_init, sd, c, seed),
            sd.train_tasks(c.train_tasks),
            sd.val,
            c,
            k_train,
            data.rating_scale,
            epoch_params=fold_tables(sd, c, seed),
        )

    tr = _meta_trained(sd, c, algo, seed, train)
    new_scale = c.get("new_item_step_scale", -1.0)
    params, step_scale, _ = calibrate_inner_rates(
        eval_fn, tr.params, sd.val, c.get("step_scales", ()), data.rating_scale, c.k,
        c.eval_chunk, new_scale=new_scale,
    )  # fmt: skip
    return (params, new_item_params(tr.params, new_scale)), eval_fn, tr.best_epoch, step_scale


def _score_seed(state, c, algo: str, names: tuple, *, log_fn=None, metrics=None, fns=None):
    """One seed's part of :func:`evaluate_point` (``state``: ``(seed, SeedData, data)``), in its
    :class:`SeedWorkers` worker or here (``fns``: the compiled functions the seeds share)."""
    seed, sd, data = state
    fns = fns or Compiled(c)
    sd = sd.view(c)
    params, eval_fn, epoch, step_scale = _train(c, fns, algo, sd, seed, data)
    out = {"epoch": epoch, "scale": step_scale, "epoch_new": None, "scores": {}, "users": {}}
    models = {name: (sd, params, eval_fn) for name in names}
    if sd.val_new_data is not None:  # the new-item stand-in's own model, its items held out
        new = sd.val_new_data.view(c)
        p_new, fn_new, out["epoch_new"], _ = _train(c, fns, algo, new, seed, data)
        models["val_new"] = (new, p_new, fn_new)
    for name, (src, p, fn) in models.items():
        tasks, scores, users = getattr(src, name), {"mae": np.nan, f"ndcg@{c.k}": np.nan}, None
        if tasks is not None:
            pred = predict_tasks(fn, p[0], tasks, c.eval_chunk, p[1])
            scores, users = evaluate(pred["pred"], tasks, data.rating_scale, c.k)
        out["scores"][name] = (scores["mae"], scores[f"ndcg@{c.k}"])
        out["users"][name] = users
    return out


def evaluate_point(cfg, method: str, point: dict, data, prepared) -> dict:
    """Meta-train ``method`` with ``point``'s config fields set, on every prepared seed; returns
    the mean best validation MAE and nDCG@k over seeds (also on the new-item validation,
    ``val_new_*``, NaN without one; and on the cold-user validation, ``val_cold_*``, where there
    is one), the best epochs and ``per_user`` (set -> one per-user record per seed, None where the
    seed has no such set). A Meta-SGD method is scored as the cold-start experiment runs
    it: its learned rates calibrated on the validation users (``cfg.step_scales``; the chosen
    scale per seed as ``step_scales``). A seed with ``val_new_data`` trains a second model on
    it, which scores the new-item stand-in (its best epochs: ``best_epochs_new``). ``prepared``:
    seed -> SeedData, or :class:`SeedWorkers` (the seeds at once, the same numbers)."""
    algo, mcfg = method_config(cfg, method)
    c = ml_collections.ConfigDict(mcfg.to_dict())
    for k, v in point.items():
        c[k] = v
    validate_config(c)
    names = ("val", *stand_ins(prepared))
    per_seed = _per_seed(prepared, data, _score_seed, c, algo, names, fns=Compiled(c))
    row = {}
    for name in names:
        row[f"{name}_mae"] = float(np.mean([s["scores"][name][0] for s in per_seed]))
        row[f"{name}_ndcg@{cfg.k}"] = float(np.mean([s["scores"][name][1] for s in per_seed]))
    row |= {
        "val_mae_per_seed": [s["scores"]["val"][0] for s in per_seed],
        "best_epochs": [s["epoch"] for s in per_seed],
        "per_user": {name: [s["users"][name] for s in per_seed] for name in names},
    }
    epochs_new = [s["epoch_new"] for s in per_seed if s["epoch_new"] is not None]
    row |= {"best_epochs_new": epochs_new} if epochs_new else {}
    scales = [s["scale"] for s in per_seed]
    return row | ({"step_scales": scales} if any(x is not None for x in scales) else {})


def grid_search(
    cfg,
    grid: dict[str, list],
    *,
    algo: str,
    seeds=(0,),
    data: mdata.RatingsData | None = None,
    log_fn: Callable = print,
) -> list[dict]:
    """One row per grid point: the values, mean best validation MAE over ``seeds``, best epochs.

    ``grid`` maps cold-start config fields (e.g. ``inner_lr``, ``meta_lr``, ``inner_steps``,
    ``adapt``) to candidate values; ``algo`` is a learner or a method of ``cfg.methods``. Rows are
    sorted best first.
    """
    if algo not in LEARNERS and algo not in cfg.methods:
        raise ValueError(f"--config.algo={algo!r}; allowed: {', '.join(LEARNERS)}")
    for k in grid:
        if k not in cfg:
            raise ValueError(
                f"unknown config field {k!r} in the tuning grid; fields: {', '.join(sorted(cfg))}"
            )
    data, prepared = prepare(cfg, seeds, data)
    rows = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        row = point | evaluate_point(cfg, algo, point, data, prepared)
        row.pop("per_user")
        log_fn(f"{algo} {point}: val MAE {row['val_mae']:.4f} (best epochs {row['best_epochs']})")
        rows.append(row)
    return sorted(rows, key=lambda r: r["val_mae"])


def search(
    cfg,
    space: dict[str, str],
    *,
    method: str,
    seeds=(0,),
    n_trials: int = 20,
    sampler_seed: int = 0,
    ndcg_weight: float = 1.0,
    new_item_weight: float = 0.0,
    cold_user_weight: float = 0.0,
    data: mdata.RatingsData | None = None,
    prepared: dict | None = None,
    log_fn: Callable = print,
    warm_start: dict | None = None,
) -> list[dict]:
    """Optuna TPE search (seeded, sequential, so reproducible) of ``space`` for ``method``,
    minimising :func:`selection_objective` of the means over ``seeds``; a space of choices only is
    searched exhaustively (grid). The first trial is the method's configured point, the second
    ``warm_start`` (config field -> value, e.g. an earlier stage's choice; fields it lacks are the
    configured ones) where given. Returns one row per trial, best first."""

    parsed = parse_space(space, cfg)
    if prepared is None:
        data, prepared = prepare(cfg, seeds, data)

    def evaluate(point):
        row = {}
        try:
            row |= evaluate_point(cfg, method, point, data, prepared)
            row["objective"] = selection_objective(
                row, cfg.k, ndcg_weight, new_item_weight, cold_user_weight
            )
        except NonFiniteLossError as e:  # a diverging point is a bad point, not a failed search
            nan = float("nan")
            row |= {"val_mae": nan, f"val_ndcg@{cfg.k}": nan, "diverged": str(e).split(";")[0]}
            for name in stand_ins(prepared):
                row |= {f"{name}_mae": nan, f"{name}_ndcg@{cfg.k}": nan}
            row |= {"objective": DIVERGED, "val_mae_per_seed": [], "best_epochs": []}
        return row

    def describe(row):
        log_fn(
            f"{method} trial {row['trial']}: objective {row['objective']:.4f} val MAE "
            f"{row['val_mae']:.4f} nDCG@{cfg.k} {row[f'val_ndcg@{cfg.k}']:.4f} new items: MAE "
            f"{row['val_new_mae']:.4f} nDCG@{cfg.k} {row[f'val_new_ndcg@{cfg.k}']:.4f} "
            + (
                f"cold users: MAE {row['val_cold_mae']:.4f} "
                f"nDCG@{cfg.k} {row[f'val_cold_ndcg@{cfg.k}']:.4f} "
                if "val_cold_mae" in row
                else ""
            )
            + f"{row['point']} (epochs {row['best_epochs']})"
        )

    starts = [start_point(cfg, method, parsed)]
    if warm_start:
        _, mcfg = method_config(cfg, method)
        unknown = sorted(set(warm_start) - set(parsed))
        if unknown:
            raise ValueError(
                f"--config.warm_starts.{method}: {unknown} not in the method's search space "
                f"({', '.join(parsed)})"
            )
        starts.append(start_values(parsed, lambda f: warm_start.get(f, mcfg[f])))
    return run_study(parsed, n_trials, sampler_seed, starts, evaluate, describe)


def start_point(cfg, method: str, parsed: dict) -> dict:
    """The method's configured values as optuna parameters: the first trial of every search, so
    the search never ends worse than the starting config."""
    _, mcfg = method_config(cfg, method)
    return start_values(parsed, lambda field: mcfg[field])


def selection_objective(
    row: dict,
    k: int,
    ndcg_weight: float,
    new_item_weight: float = 0.0,
    cold_user_weight: float = 0.0,
) -> float:
    """What selection minimises: validation MAE minus ``ndcg_weight`` x validation nDCG@k (both
    target metrics of the protocol; weight 0 = MAE alone), averaged with weight
    ``new_item_weight`` with the same on the new-item validation (``val_new_*``) and with weight
    ``cold_user_weight`` with the same on the cold-user validation (``val_cold_*``)."""

    def term(prefix):
        return row[f"{prefix}_mae"] - ndcg_weight * row[f"{prefix}_ndcg@{k}"]

    if not new_item_weight and not cold_user_weight:
        return float(term("val"))
    total = (1 - new_item_weight - cold_user_weight) * term("val")
    if new_item_weight:
        total += new_item_weight * term("val_new")
    if cold_user_weight:
        total += cold_user_weight * term("val_cold")
    return float(total)


def _baselines_seed(state, cfg, names: tuple, *, log_fn=None, metrics=None) -> dict:
    """One seed's part of :func:`baselines_on_validation`: baseline -> set -> ``(MAE, nDCG@k,
    per-user record)``."""
    seed, sd, data = state
    k = cfg.k
    parts = [(sd, names)]  # (data whose training ratings fit the baselines, sets it scores)
    if sd.val_new_data is not None:
        parts = [(sd, tuple(n for n in names if n != "val_new")), (sd.val_new_data, ("val_new",))]
    out: dict[str, dict] = {}
    for name in cfg.baselines:
        if name == "no_adapt":  # a method's own start, not a baseline of its own
            continue
        for src, part in parts:
            sets = {n: getattr(src, f"{n}_sets") for n in part}
            sets = {n: v for n, v in sets.items() if v is not None}
            if name == "finetune":
                tasks = {n: getattr(src, n) for n in sets}
                got = finetune.fit_and_score(src, cfg, seed, data.rating_scale, tasks)
            else:
                pred = baseline_predictions(name, seed, src.fit_ratings, sets)
                got = {n: evaluate(pred[n], getattr(src, n), data.rating_scale, k) for n in sets}
            for n in part:
                sc, users = got.get(n, ({"mae": np.nan, f"ndcg@{k}": np.nan}, None))
                out.setdefault(name, {})[n] = (sc["mae"], sc[f"ndcg@{k}"], users)
    return out


def baselines_on_validation(cfg, data, prepared, per_user: dict | None = None) -> dict:
    """Mean validation MAE and nDCG@k over seeds of every baseline of ``cfg.baselines`` but
    ``no_adapt`` (fitted, or for ``finetune`` trained, on the same training ratings), on the
    validation users and on the stand-ins that exist (``val_new_*``, NaN without one; ``val_cold_*``
    only with a cold-user validation): the reference the tuned methods are read against.
    ``per_user`` (if given) receives baseline -> set -> one per-user record per seed."""
    names = ("val", *stand_ins(prepared))
    per_seed = _per_seed(prepared, data, _baselines_seed, cfg, names)
    rows: dict[str, dict[str, list]] = {}
    for found in per_seed:
        for name, by_set in found.items():
            row = rows.setdefault(name, {})
            for n, (mae, ndcg, users) in by_set.items():  # the order the sets were scored
                if per_user is not None:
                    per_user.setdefault(name, {}).setdefault(n, []).append(users)
                row.setdefault(f"{n}_mae", []).append(mae)
                row.setdefault(f"{n}_ndcg@{cfg.k}", []).append(ndcg)
    return {name: {key: float(np.mean(v)) for key, v in row.items()} for name, row in rows.items()}


def method_entry(cfg, method: str, point: dict) -> dict:
    """The ``cfg.methods`` entry a tuned point becomes: the method's own overrides (or just its
    learner) plus the chosen fields."""
    base = cfg.methods[method].to_dict() if method in cfg.methods else {"algo": method}
    return base | {k: list(v) if isinstance(v, tuple) else v for k, v in point.items()}


def select(
    cfg,
    spaces: dict[str, dict[str, str]],
    *,
    seeds=(0,),
    n_trials: int = 20,
    sampler_seed: int = 0,
    ndcg_weight: float = 1.0,
    new_item_weight: float = 0.0,
    cold_user_weight: float = 0.0,
    data: mdata.RatingsData | None = None,
    log_fn: Callable = print,
    warm_starts: dict | None = None,
) -> dict:
    """Tune every method of ``spaces`` (method -> search space; ``warm_starts``: method -> a
    point tried second, see :func:`search`) and name the recommended one (the lowest
    :func:`selection_objective`). Returns the ``tuned.json`` content (no provenance),
    ``per_user`` (method -> trial -> :func:`evaluate_point`'s per-user records) and
    ``per_user_baselines`` (:func:`baselines_on_validation`'s)."""
    with prepared_seeds(cfg, seeds, data, log_fn) as (data, prepared):
        out = {"methods": {}, "validation": {}, "trials": {}, "per_user": {}}
        for method, space in spaces.items():
            rows = search(
                cfg,
                dict(space),
                method=method,
                seeds=seeds,
                n_trials=n_trials,
                sampler_seed=sampler_seed,
                ndcg_weight=ndcg_weight,
                new_item_weight=new_item_weight,
                cold_user_weight=cold_user_weight,
                data=data,
                prepared=prepared,
                log_fn=log_fn,
                warm_start=(warm_starts or {}).get(method),
            )
            best = rows[0]
            out["methods"][method] = method_entry(cfg, method, best["point"])
            # the chosen trial's scores, in the order tuned.json has always listed them
            keys = [
                f"{part}_{m}"
                for part in ("val", "val_new", "val_cold")
                for m in ("mae", f"ndcg@{cfg.k}")
            ]
            keys = ["objective", *keys, "val_mae_per_seed", "best_epochs"]
            out["validation"][method] = {k: best[k] for k in keys if k in best}
            out["per_user"][method] = {
                r["trial"]: r.pop("per_user") for r in rows if "per_user" in r
            }
            out["trials"][method] = rows
        out["recommended"] = min(out["validation"], key=lambda m: out["validation"][m]["objective"])
        base_users = out["per_user_baselines"] = {}
        out["baselines_validation"] = baselines_on_validation(cfg, data, prepared, base_users)
    return out


def write_results(workdir: str, res: dict, write_config: str, keys) -> None:
    """``tune.json`` (everything) in ``workdir`` and, when ``write_config`` names a file, the
    config file the experiment reads (``keys`` of ``res``)."""
    write_json_atomic(os.path.join(workdir, "tune.json"), res)
    if write_config:
        write_json_atomic(write_config, {k: res[k] for k in keys})
        print(f"wrote {write_config}")


def main(cfg: ml_collections.ConfigDict, workdir: str, argv: list[str] | None = None) -> dict:
    """The script body. With ``cfg.spaces``: :func:`select`, ``tune.json`` in ``workdir`` and,
    with ``cfg.write_config``, that config file (read by the cold-start default config). Without
    spaces: the grid search of ``cfg.grid`` for ``cfg.algo`` (``tune.json`` only)."""
    from experiments.common import prepare_workdir
    from metarec.training.runlog import run_metadata

    prepare_workdir(workdir, "tune")
    seeds = tuple(int(s) for s in cfg.seeds)
    if not cfg.spaces:
        grid = {k: list(v) if isinstance(v, (tuple, list)) else [v] for k, v in cfg.grid.items()}
        rows = grid_search(cfg.base, grid, algo=cfg.algo, seeds=seeds)
        out = {"algo": cfg.algo, "grid": grid, "seeds": list(seeds), "base": cfg.base.to_dict()}
        write_json_atomic(os.path.join(workdir, "tune.json"), out | {"rows": rows})
        print("best:", rows[0])
        return out | {"rows": rows}
    validate_config(cfg.base)
    if cfg.new_item_weight and not cfg.base.val_new_items:
        raise ValueError(
            f"--config.new_item_weight={cfg.new_item_weight} needs a new-item validation: set "
            "--config.base.val_new_items in (0, 1) or --config.new_item_weight=0"
        )
    cold_w = cfg.get("cold_user_weight", 0.0)
    if cold_w and not cfg.base.get("val_cold_users", 0.0):
        raise ValueError(
            f"--config.cold_user_weight={cold_w} needs a cold-user validation: set "
            "--config.base.val_cold_users in (0, 1) or --config.cold_user_weight=0"
        )
    if not 0 <= cfg.new_item_weight + cold_w <= 1:
        raise ValueError(
            f"--config.new_item_weight + --config.cold_user_weight = {cfg.new_item_weight + cold_w}"
            "; allowed: 0 to 1 (the rest weighs the warm validation users)"
        )
    spaces = {m: dict(s) for m, s in cfg.spaces.items()}
    warm = {m: dict(p) for m, p in cfg.get("warm_starts", {}).items()}
    if set(warm) - set(spaces):
        raise ValueError(
            f"--config.warm_starts: {sorted(set(warm) - set(spaces))} not searched; allowed: "
            f"{', '.join(spaces)}"
        )
    res = select(
        cfg.base,
        spaces,
        seeds=seeds,
        n_trials=cfg.n_trials,
        sampler_seed=cfg.sampler_seed,
        ndcg_weight=cfg.ndcg_weight,
        new_item_weight=cfg.new_item_weight,
        cold_user_weight=cold_w,
        warm_starts=warm,
    )
    per_user = {"methods": res.pop("per_user"), "baselines": res.pop("per_user_baselines")}
    write_json_atomic(os.path.join(workdir, "trials_per_user.json"), per_user)
    weights = {"val": 1 - cfg.new_item_weight - cold_w, "val_new": cfg.new_item_weight}
    res["selection_noise"] = selection_noise(
        res, per_user, weights | {"val_cold": cold_w}, cfg.ndcg_weight, cfg.base.k, warm
    )
    meta = run_metadata(cfg.to_dict(), argv)
    res["provenance"] = {
        "command": meta["command"],
        "seeds": list(seeds),
        "n_trials": cfg.n_trials,
        "sampler_seed": cfg.sampler_seed,
        "objective": (
            f"{1 - cfg.new_item_weight - cold_w} x "
            f"(val MAE - {cfg.ndcg_weight} x val nDCG@{cfg.base.k})"
            f" + {cfg.new_item_weight} x the same on items held out of training "
            f"({cfg.base.val_new_items} of the items, val_hold_out={cfg.base.val_hold_out}, "
            f"val_whole_years={cfg.base.val_whole_years}, "
            f"val_rebuild_tasks={cfg.base.val_rebuild_tasks}"
            + (", val_new_model=separate)" if cfg.base.get("val_new_model") == "separate" else ")")
            + (
                f" + {cold_w} x the same on users held out of training "
                f"({cfg.base.val_cold_users} of the other training users)"
                if cold_w
                else ""
            )
        ),
        "spaces": spaces,
        "warm_starts": warm,
        "selected_on": "validation users of the warm training users; no test task encoded"
        + ("" if cfg.base.get("val_support_in_fit", True) else "; none of their ratings fitted"),
        # every query rating of these seeds' test scenarios dropped from the tuning data
        "sealed_against_seeds": list(cfg.base.get("val_seal_seeds", ())),
        "versions": meta["versions"],
    }
    keys = ("methods", "validation", "baselines_validation", "recommended", "provenance")
    write_results(workdir, res, cfg.write_config, keys)
    for m, v in res["validation"].items():
        print(f"{m}: objective {v['objective']:.4f} val MAE {v['val_mae']:.4f} {res['methods'][m]}")
    for m, v in res["baselines_validation"].items():
        print(f"baseline {m}: val MAE {v['val_mae']:.4f}")
    print(f"recommended: {res['recommended']}")
    return res
