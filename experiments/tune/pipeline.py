"""Hyper-parameter selection on validation users only (never on a test scenario).

:func:`grid_search` meta-trains one learner for every combination of a small grid on the warm-train
users of the given seeds (minus their validation users) and scores each on the validation users'
query sets (after adaptation on their support sets), exactly as early stopping does. The split
knows which users are test users (it must, to leave them out), but no test task is encoded:
``prepare_seed(..., test=False)``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import jax
import ml_collections

from experiments.coldstart.build import Compiled, prepare_seed, validate_config
from metarec import data as mdata
from metarec.meta import LEARNERS
from metarec.training.meta_train import meta_train
from metarec.training.runlog import write_json_atomic


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
    ``adapt``) to candidate values. Rows are sorted best first.
    """
    if algo not in LEARNERS:
        raise ValueError(f"--config.algo={algo!r}; allowed: {', '.join(LEARNERS)}")
    for k in grid:
        if k not in cfg:
            raise ValueError(
                f"unknown config field {k!r} in the tuning grid; fields: {', '.join(sorted(cfg))}"
            )
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    prepared = {seed: prepare_seed(data, seed, cfg, test=False) for seed in seeds}
    rows = []
    for values in itertools.product(*grid.values()):
        c = ml_collections.ConfigDict(cfg.to_dict())
        for k, v in zip(grid, values):
            c[k] = v
        validate_config(c)
        fns = Compiled(c)
        maes, epochs = [], []
        for seed, sd in prepared.items():
            spec = sd.encoder.spec
            fns.use_seed(seed).load_pretrained(sd.encoder, seed)
            init_fn, _ = fns.model(spec)
            k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
            tr = meta_train(
                fns.learner(spec, algo),
                fns.step(spec, algo),
                fns.eval(spec, algo),
                init_fn(k_init),
                sd.train,
                sd.val,
                c,
                k_train,
                data.rating_scale,
            )
            maes.append(tr.best_val_mae)
            epochs.append(tr.best_epoch)
        point = dict(zip(grid, values))
        row = point | {"val_mae": sum(maes) / len(maes), "best_epochs": epochs}
        log_fn(f"{algo} {point}: val MAE {row['val_mae']:.4f} (best epochs {epochs})")
        rows.append(row)
    return sorted(rows, key=lambda r: r["val_mae"])


def main(cfg: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """The script body: search, write ``tune.json`` (rows best first), print the best row."""
    from experiments.common import prepare_workdir

    prepare_workdir(workdir, "tune")
    grid = {k: list(v) if isinstance(v, (tuple, list)) else [v] for k, v in cfg.grid.items()}
    rows = grid_search(cfg.base, grid, algo=cfg.algo, seeds=tuple(cfg.seeds))
    out = {"algo": cfg.algo, "grid": grid, "seeds": list(cfg.seeds), "base": cfg.base.to_dict()}
    write_json_atomic(os.path.join(workdir, "tune.json"), out | {"rows": rows})
    print("best:", rows[0])
    return rows
