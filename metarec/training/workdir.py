"""A run's work folder: refuse to mix runs, check a resumed run against the one it continues, record
every invocation.

Every resumable script calls :func:`open_run` once: it refuses a folder that already holds a run
unless ``resume``; on resume it compares the saved config and data checksum with the new ones (only
the ``mutable`` fields may change) and it writes ``config.json`` and ``run.json`` (run metadata plus
the list of invocations).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable

from metarec.training.runlog import read_json, run_metadata, write_json_atomic


class _Missing:
    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of config fields whose values differ (or exist on one side only); a field that
    is a dict on both sides is compared field by field (``methods.cf_metasgd.epochs``)."""
    out = []
    for k in set(old) | set(new):
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return sorted(out)


def is_mutable(name: str, mutable) -> bool:
    """Whether the dotted field ``name`` may change on resume: it or a dict holding it matches an
    entry of ``mutable`` (``fnmatch`` patterns, e.g. ``methods.*.epochs``)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, m) for p in prefixes for m in mutable)


def _get(config: dict, name: str):
    """The value of the field ``name``, a key or a dotted path (``<missing>`` where absent)."""
    if name in config:
        return config[name]
    head, _, rest = name.partition(".")
    if rest and isinstance(config.get(head), dict):
        return _get(config[head], rest)
    return _MISSING


def check_resume(
    workdir: str,
    config: dict,
    *,
    resume: bool,
    mutable=(),
    data_sha256: str | None = None,
    state=("config.json",),
    log_fn: Callable = print,
) -> list[str]:
    """Check ``workdir`` against ``resume`` and the saved ``config.json``; write the new one.

    ``state``: names whose presence means the folder holds a run. Returns the dotted config fields
    that changed since the saved run (only those :func:`is_mutable` allows; top-level fields new in
    the code are accepted with their defaults). Raises ``ValueError`` naming the conflict and what
    to do.
    """
    os.makedirs(workdir, exist_ok=True)
    config = json.loads(json.dumps(config))  # as saved: tuples become lists
    cfg_path = os.path.join(workdir, "config.json")
    held = [p for p in state if os.path.exists(os.path.join(workdir, p))]
    changed: list[str] = []
    if held and not resume:
        raise ValueError(
            f"--workdir={workdir} already holds a run ({', '.join(held)}); pass --resume to "
            "continue it, --overwrite to start it again, or choose another --workdir"
        )
    if resume and os.path.exists(cfg_path):
        saved = read_json(cfg_path)
        changed = config_diff(saved["config"], config)
        added = [k for k in changed if k in config and k not in saved["config"]]
        if added:
            log_fn(
                "--resume: config fields new since the run started (their defaults are used): "
                + ", ".join(added)
            )
        fixed = [k for k in changed if not is_mutable(k, mutable) and k not in added]
        if fixed:
            detail = "; ".join(
                f"{k}: {_get(saved['config'], k)!r} -> {_get(config, k)!r}" for k in fixed
            )
            raise ValueError(
                f"--resume: the run in {workdir} was started with a different config ({detail}); "
                f"only {', '.join(mutable) or 'nothing'} may change on resume. Use the original "
                "settings or a fresh --workdir"
            )
        old_sha = saved.get("data_sha256")
        if old_sha not in (None, data_sha256):
            raise ValueError(
                f"--resume: the data changed since the run in {workdir} started (ratings sha256 "
                f"{old_sha[:12]}... -> {str(data_sha256)[:12]}...); use a fresh --workdir"
            )
        if changed:
            log_fn(f"resuming with changed settings: {', '.join(changed)}")
    elif resume:
        log_fn(f"--resume: nothing to resume in {workdir}; starting a fresh run")
    write_json_atomic(cfg_path, {"config": config, "data_sha256": data_sha256})
    return changed


def record_invocation(workdir: str, meta: dict, *, resume: bool) -> None:
    """Write ``run.json``: ``meta`` (see :func:`~metarec.training.runlog.run_metadata`) plus the
    commands of every invocation of this run (the earlier ones kept on resume)."""
    path = os.path.join(workdir, "run.json")
    history = read_json(path).get("invocations", []) if resume and os.path.exists(path) else []
    write_json_atomic(path, meta | {"invocations": history + [meta["command"]]})


def record_timing(workdir: str, timing: dict, *, since: float | None = None) -> bool:
    """Add ``timing`` (e.g. :func:`metarec.training.compile_time.split_seconds`: wall, compile and
    compute seconds of this invocation) to ``<workdir>/run.json`` as ``"timing"``. With ``since``
    (a ``time.time()``) only a run.json written after it is touched: one another script left in a
    shared folder keeps its own. Returns whether it was written."""
    path = os.path.join(workdir, "run.json")
    if not os.path.isfile(path) or (since is not None and os.path.getmtime(path) < since):
        return False
    write_json_atomic(path, read_json(path) | {"timing": timing})
    return True


def open_run(
    workdir: str,
    config: dict,
    *,
    resume: bool,
    mutable=(),
    data_sha256: str | None = None,
    state=("config.json",),
    argv: list[str] | None = None,
    log_fn: Callable = print,
) -> tuple[dict, list[str]]:
    """:func:`check_resume` then :func:`record_invocation`. Returns ``(run metadata, changed
    fields)``."""
    changed = check_resume(
        workdir,
        config,
        resume=resume,
        mutable=mutable,
        data_sha256=data_sha256,
        state=state,
        log_fn=log_fn,
    )
    meta = run_metadata(config, argv)
    record_invocation(workdir, meta, resume=resume)
    return meta, changed
