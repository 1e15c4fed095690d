"""Hyper-parameter selection on validation users only (never on a test scenario).

:func:`grid_search` meta-trains one algorithm for every combination of a small grid on the
warm-train users of the given seeds (minus their validation users) and scores each on the validation
users' query sets (after adaptation on their support sets), exactly as early stopping does. The test
scenarios are built (the split needs them) but never evaluated.
"""

from __future__ import annotations

import itertools
from typing import Callable

import jax
import ml_collections

from metarec import coldstart
from metarec import data as mdata


def grid_search(
    cfg, grid: dict[str, list], *, algo: str, seeds=(0,), data: mdata.RatingsData | None = None,
    log_fn: Callable = print,
) -> list[dict]:
    """Return one row per grid point: the values, mean best validation MAE over ``seeds``, epochs.

    ``grid`` maps config fields (e.g. ``inner_lr``, ``meta_lr``, ``inner_steps``, ``adapt``) to
    candidate values. Rows are sorted best first.
    """
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    for k in grid:
        if k not in cfg:
            raise ValueError(f"unknown config field {k!r} in the tuning grid; fields: {sorted(cfg.keys())}")
    prepared = {seed: coldstart.prepare_seed(data, seed, cfg) for seed in seeds}
    rows = []
    for values in itertools.product(*grid.values()):
        c = ml_collections.ConfigDict(cfg.to_dict())
        for k, v in zip(grid, values):
            c[k] = v
        coldstart.validate_config(c)
        fns = coldstart.Compiled(c)
        maes, epochs = [], []
        for seed, sd in prepared.items():
            spec = sd.encoder.spec
            fns.use_seed(seed)
            init_fn, _ = fns.model(spec)
            k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
            tr = coldstart.meta_train(
                fns.learner(spec, algo), fns.step(spec, algo), fns.eval(spec, algo), init_fn(k_init),
                sd.train, sd.val, c, k_train, data.rating_scale,
            )  # fmt: skip
            maes.append(tr.best_val_mae)
            epochs.append(tr.best_epoch)
        row = dict(zip(grid, values)) | {"val_mae": sum(maes) / len(maes), "best_epochs": epochs}
        log_fn(f"{algo} {dict(zip(grid, values))}: val MAE {row['val_mae']:.4f} (best epochs {epochs})")
        rows.append(row)
    return sorted(rows, key=lambda r: r["val_mae"])
