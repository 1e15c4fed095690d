"""Search spaces and the optuna study every tune stage runs (the cold-start stage,
:mod:`experiments.tune.pipeline`, and the meta-RL one, :mod:`experiments.tune.meta_rl`).

A search-space entry is a string: ``"log:LO:HI"`` (log-uniform float), ``"float:LO:HI"``,
``"int:LO:HI"`` or ``"choice:A,B,..."`` (for a tuple field, ``none`` is ``()`` and ``64/32`` is
``(64, 32)``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from experiments.common import config_value

SPACE_KINDS = ("log", "float", "int", "choice")


def _parse_choice(value: str, like):
    if isinstance(like, tuple):
        return () if value in ("none", "") else tuple(int(v) for v in value.split("/"))
    if isinstance(like, bool):
        if value not in ("True", "False"):
            raise ValueError
        return value == "True"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def fixed_value(value) -> str:
    """``value`` as a one-value ``choice`` entry that :func:`parse_space` reads back as ``value``
    (``str()`` of a float reads back as the same float; a tuple or list as ``64/32``)."""
    if isinstance(value, (tuple, list)):
        return "choice:" + ("/".join(str(int(v)) for v in value) if value else "none")
    return f"choice:{value}"


def point_spaces(point: dict[str, dict], free: dict[str, dict[str, str]]) -> dict:
    """Spaces (method -> {field: entry}) that fix every field of ``point`` (method -> {field:
    value}) except ``free``'s (method -> {field: entry}): a stage on them is a grid at ``point``
    (a space made only of choices is searched as a grid)."""
    spaces = {m: {f: fixed_value(v) for f, v in fields.items()} for m, fields in point.items()}
    for method, fields in free.items():
        spaces.setdefault(method, {}).update(fields)
    return spaces


def parse_space(space: dict[str, str], cfg) -> dict[str, tuple]:
    """``{field: (kind, args)}`` from the string form of the module docstring (``section/field``
    names a section's field); a bad entry raises ``ValueError`` naming the field and the allowed
    forms."""
    out = {}
    for field, spec in space.items():
        try:
            like = config_value(cfg, field)
        except KeyError:
            raise ValueError(
                f"--config.space.{field}: not a field of the tuned experiment's config; fields: "
                f"{', '.join(sorted(cfg))}"
            ) from None
        kind, _, rest = str(spec).partition(":")
        try:
            if kind in ("log", "float"):
                lo, hi = (float(v) for v in rest.split(":"))
                if not lo < hi or (kind == "log" and lo <= 0):
                    raise ValueError
                out[field] = (kind, (lo, hi))
            elif kind == "int":
                lo, hi = (int(v) for v in rest.split(":"))
                if not lo <= hi:
                    raise ValueError
                out[field] = (kind, (lo, hi))
            elif kind == "choice":
                values = [_parse_choice(v, like) for v in rest.split(",")]
                if not values:
                    raise ValueError
                out[field] = (kind, tuple(values))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--config.space.{field}={spec!r}; allowed: 'log:LO:HI' (0 < LO < HI), "
                "'float:LO:HI', 'int:LO:HI' or 'choice:A,B,...'"
            ) from None
    return out


def run_study(
    parsed: dict,
    n_trials: int,
    sampler_seed: int,
    starts: list[dict],
    evaluate: Callable[[dict], dict],
    describe: Callable[[dict], None],
) -> list[dict]:
    """The search every tune stage runs: :func:`make_study`, ``starts`` (optuna parameters, e.g.
    :func:`start_values`) as the first trials unless the space is a grid, then each proposed
    point scored by ``evaluate(point) -> row`` (holding ``objective``) and logged by
    ``describe(row)``. Returns the rows (with ``trial`` and ``point``), best first."""
    import optuna

    study, n_trials = make_study(parsed, n_trials, sampler_seed)
    if not isinstance(study.sampler, optuna.samplers.GridSampler):
        for start in starts:
            study.enqueue_trial(start)
    rows = []

    def objective(trial):
        point = suggest_point(trial, parsed)
        row = {"trial": trial.number, "point": point} | evaluate(point)
        describe(row)
        rows.append(row)
        return row["objective"]

    study.optimize(objective, n_trials=n_trials)
    return sorted(rows, key=lambda r: r["objective"])


def make_study(parsed: dict, n_trials: int, sampler_seed: int):
    """``(optuna study minimising, number of trials)``: a space of choices only is searched
    exhaustively (optuna's grid sampler, every point once, whatever ``n_trials`` says), any other
    with the seeded TPE sampler (sequential, so a rerun proposes the same points)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if all(kind == "choice" for kind, _ in parsed.values()):
        grid = {f: list(range(len(args))) for f, (_, args) in parsed.items()}
        sampler = optuna.samplers.GridSampler(grid, seed=sampler_seed)
        n_trials = int(np.prod([len(v) for v in grid.values()]))
    else:
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=min(6, n_trials))
    return optuna.create_study(direction="minimize", sampler=sampler), n_trials


def suggest_point(trial, parsed: dict) -> dict:
    """The values optuna's ``trial`` proposes for the parsed space (choices by index)."""
    point = {}
    for field, (kind, args) in parsed.items():
        if kind == "log":
            point[field] = trial.suggest_float(field, *args, log=True)
        elif kind == "float":
            point[field] = trial.suggest_float(field, *args)
        elif kind == "int":
            point[field] = trial.suggest_int(field, *args)
        else:
            point[field] = args[trial.suggest_categorical(field, list(range(len(args))))]
    return point


def start_values(parsed: dict, value_of: Callable) -> dict:
    """Optuna parameters of the current values ``value_of(field)`` of a parsed space (a choice
    by its index; values outside the space are left to the sampler)."""
    out = {}
    for field, (kind, args) in parsed.items():
        v = value_of(field)
        if kind == "choice":
            if v in args:
                out[field] = args.index(v)
        elif args[0] <= v <= args[1]:
            out[field] = v
    return out
