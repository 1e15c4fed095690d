"""The one way every experiment script runs: shared flags, a quiet terminal, one-line errors.

Each ``experiments/<name>/main.py`` defines its config flag and calls :func:`run_main`::

    _CONFIG = common.define_config(__file__)
    common.define_run_flags(default_workdir="runs/coldstart")
    ...
    if __name__ == "__main__":
        common.run_main("coldstart", lambda: pipeline.main(_CONFIG.value, FLAGS.workdir, ...))

The terminal shows progress lines, warnings and the result table; library INFO logs (orbax, absl,
``logging``) go to ``<workdir>/<name>.INFO``. A user-facing error (bad file, folder, flag or config
value, non-finite training) prints one line ``<name>: error: ...`` and exits with status 1;
``--traceback`` shows the Python traceback instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import time
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from metarec.data import DataFormatError
from metarec.training.compile_time import (
    compile_seconds,
    split_seconds,
    stage_seconds,
    worker_compile_seconds,
    worker_stage_seconds,
)
from metarec.training.runlog import remove_run_files
from metarec.training.trainer import NonFiniteLossError
from metarec.training.workdir import record_timing

FLAGS = flags.FLAGS
# errors whose message is written for the user: shown as one line without a traceback
USER_ERRORS = (
    DataFormatError,
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    NonFiniteLossError,
)


def config_path(main_file: str, name: str) -> str:
    """``configs/<name>.py`` beside an experiment's ``main.py`` (a flag default that works from any
    working directory)."""
    return os.path.join(os.path.dirname(os.path.abspath(main_file)), "configs", f"{name}.py")


def define_config(main_file: str, default: str = "default", name: str = "config"):
    """``config_flags.DEFINE_config_file`` with ``configs/<default>.py`` beside ``main_file`` as the
    default. config_flags reads the ``--config.<field>`` overrides while the flag is defined (at
    import), so an unknown field is reported here, as one line."""
    try:
        return config_flags.DEFINE_config_file(name, config_path(main_file, default))
    except (AttributeError, KeyError) as e:
        if "--traceback" in sys.argv:
            raise
        msg = e
        while isinstance(msg, BaseException) and msg.args:  # AttributeError(KeyError(text))
            msg = msg.args[0]
        first, _, hint = str(msg).partition("\n")
        field = first.strip("\"'")
        bad = [a.split("=")[0] for a in sys.argv[1:] if a.split("=")[0].endswith(f".{field}")]
        script = os.path.basename(os.path.dirname(os.path.abspath(main_file)))
        hint = f" ({hint.strip()})" if hint.strip() else ""
        _fail(script, f"{bad[0] if bad else field}: unknown config field{hint}")


def define_run_flags(default_workdir: str | None, *, resumable: bool = True) -> None:
    """``--workdir``, ``--traceback`` and, for resumable runs, ``--resume`` / ``--overwrite``."""
    flags.DEFINE_string(
        "workdir", default_workdir, "Folder for this run's results, logs and checkpoints."
    )
    flags.DEFINE_bool(
        "traceback", False, "Show the Python traceback of an error instead of one line."
    )
    if not resumable:
        return
    flags.DEFINE_bool(
        "resume", False, "Continue the interrupted run in --workdir from its checkpoints."
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Delete this script's files in --workdir (nothing else) and start again.",
    )
    flags.register_multi_flags_validator(
        ["resume", "overwrite"],
        lambda f: not (f["resume"] and f["overwrite"]),
        "--resume and --overwrite contradict each other: --resume continues the run in --workdir, "
        "--overwrite deletes it",
    )


#: the environment variable that moves (a folder) or turns off (0) the compilation cache
CACHE_ENV = "METAREC_COMPILATION_CACHE"
_CACHE_OFF = ("0", "off", "false", "no")


def compilation_cache_dir(environ=None) -> str | None:
    """The persistent compilation cache folder that ``$METAREC_COMPILATION_CACHE`` asks for: unset,
    empty or ``1`` -> ``~/.cache/metarec/jax``; ``0`` / ``off`` / ``false`` / ``no`` -> None (no
    cache); anything else is the folder."""
    value = (os.environ if environ is None else environ).get(CACHE_ENV, "").strip()
    if value.lower() in _CACHE_OFF:
        return None
    if value in ("", "1"):
        return os.path.join(os.path.expanduser("~"), ".cache", "metarec", "jax")
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            f"{CACHE_ENV}={value}: not a folder (give a folder for the compilation cache, or 0 to "
            "turn it off)"
        )
    return path


def enable_compilation_cache(environ=None) -> str | None:
    """Turn on JAX's persistent compilation cache in :func:`compilation_cache_dir` (a second run
    with the same shapes loads executables instead of compiling them); every entry point calls it
    through :func:`run_main`, the test suite from ``tests/conftest.py``. Returns the folder, or None
    when ``$METAREC_COMPILATION_CACHE`` turned it off (JAX's own settings are then left alone).

    Every program is written, however quick to compile (JAX's default keeps only those over 1 s):
    a run compiles hundreds of small ones, and seed worker processes started together load the
    ones another process compiled first."""
    cache = compilation_cache_dir(environ)
    if cache is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return cache


def prepare_workdir(workdir: str, name: str, run_files=(), *, overwrite: bool = False) -> str:
    """Create ``workdir`` (after deleting this script's ``run_files`` and its logs with
    ``--overwrite``) and send library INFO logs to ``<workdir>/<name>.INFO`` (absl's log file);
    warnings still reach the terminal."""
    if overwrite:
        logs = glob.glob(os.path.join(glob.escape(workdir), f"{glob.escape(name)}.*"))
        remove_run_files(workdir, [*run_files, *(os.path.basename(p) for p in logs)])
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"--workdir={workdir} exists and is not a folder")
    os.makedirs(workdir, exist_ok=True)
    absl_logging.get_absl_handler().use_absl_log_file(name, workdir)
    FLAGS.stderrthreshold = "warning"
    return workdir


# what a training experiment owns in its workdir (the only files --overwrite deletes)
TRAINING_RUN_FILES = (
    "checkpoints",
    "units",
    "config.json",
    "run.json",
    "metrics.jsonl",
    "metrics.csv",
    "tb",
    "results.json",
    "results.md",
    "report",
    "train_log.txt",
)


@contextlib.contextmanager
def train_log(workdir: str, resume: bool = False):
    """``log_fn`` writing every line to ``<workdir>/train_log.txt`` (appended on ``resume``) and
    the lines that are not indented to the terminal."""
    with open(os.path.join(workdir, "train_log.txt"), "a" if resume else "w") as log_file:

        def log_fn(msg: str) -> None:
            log_file.write(msg + "\n")
            log_file.flush()
            if not msg.startswith("  "):
                print(msg, flush=True)

        yield log_fn


def write_results(workdir: str, res: dict, table: str, *, fenced: bool = True) -> str:
    """Write ``results.json`` (atomically) and ``results.md`` (``table``, in a code fence unless
    it is Markdown already), print the table; returns the path of ``results.json``."""
    from metarec.training.runlog import write_json_atomic

    path = write_json_atomic(os.path.join(workdir, "results.json"), res)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(("```\n" + table + "\n```\n") if fenced else table + "\n")
    print()
    print(table)
    print(f"wrote {path}")
    return path


def quiet_terminal() -> None:
    """For scripts without a workdir: only library warnings and errors reach the terminal."""
    absl_logging.set_verbosity(absl_logging.WARNING)


def _fail(name: str, msg) -> None:
    one_line = " ".join(part.strip() for part in str(msg).splitlines() if part.strip())
    print(f"{name}: error: {one_line}", file=sys.stderr)
    sys.exit(1)


def _flags_parser(name: str) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing with every error (a bad flag, a config file that does not load, an
    unknown ``--config.<field>``) reported as one line."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return FLAGS(argv)
        except Exception as e:  # config_flags raises plain exceptions from the config file too
            if "--traceback" in argv:
                raise
            _fail(name, e)

    return parse


def _load_configs() -> None:
    """Load every config-file flag now: config_flags defers loading the file and applying the
    ``--config.<field>`` overrides to the first access, where its errors would surface as
    tracebacks."""
    for flag in {id(f): f for f in FLAGS._flags().values()}.values():
        if type(flag).__name__ != "_ConfigFlag":
            continue
        try:
            flag.value.to_dict()
        except (AttributeError, KeyError) as e:
            field = str(e).strip("\"'")
            raise ValueError(f"--{flag.name}.{field}: unknown config field") from None
        except OSError as e:
            path = getattr(flag, "config_filename", "?")
            detail = str(e).strip().splitlines()[-1].strip()
            raise ValueError(
                f"--{flag.name}={path}: the config file cannot be loaded ({detail})"
            ) from None


@contextlib.contextmanager
def run_timing(workdir: str | None):
    """Time the block; if it ends without an error and wrote ``<workdir>/run.json``, add its wall,
    compile and compute seconds there as ``"timing"`` (compile: JAX's trace / lower / compile
    events, :mod:`metarec.training.compile_time`). A run.json the block did not write (another
    script's, in a shared folder) is left alone."""
    started, wall0, compiled0 = time.time(), time.perf_counter(), compile_seconds()
    stages0, workers0 = stage_seconds(), worker_compile_seconds()
    worker_stages0 = worker_stage_seconds()
    yield
    if workdir:
        wall = time.perf_counter() - wall0
        timing = split_seconds(wall, compiled0, stages0, workers0, worker_stages0)
        record_timing(workdir, timing, since=started - 1.0)  # 1 s: file-time granularity


def run_main(name: str, body: Callable[[], object]) -> None:
    """``absl.app.run`` a script body with :data:`USER_ERRORS` turned into one line on stderr, the
    compilation cache on (:func:`enable_compilation_cache`) and, when the body wrote
    ``<workdir>/run.json``, this invocation's compile and compute seconds added to it."""

    def main(argv):
        if len(argv) > 1:
            _fail(
                name,
                f"unexpected arguments: {' '.join(argv[1:])} (settings are --config.<field>=...)",
            )
        try:
            _load_configs()
            enable_compilation_cache()
            with run_timing(FLAGS["workdir"].value if "workdir" in FLAGS else None):
                body()
        except USER_ERRORS as e:
            if FLAGS.traceback:
                raise
            _fail(name, e.args[0] if isinstance(e, KeyError) and e.args else e)

    app.run(main, flags_parser=_flags_parser(name))


def run_resumable(name: str, module: str, pipeline_main: Callable, config_holder) -> None:
    """The whole ``__main__`` of a resumable experiment: ``pipeline_main(config, workdir, resume=,
    overwrite=, argv=)`` under :func:`run_main` (``module``: the script's ``-m`` name, recorded as
    the command in the run's metadata)."""

    def body():
        argv = ["-m", module, *sys.argv[1:]]
        pipeline_main(
            config_holder.value,
            FLAGS.workdir,
            resume=FLAGS.resume,
            overwrite=FLAGS.overwrite,
            argv=argv,
        )

    run_main(name, body)


def split_names(values) -> tuple[str, ...]:
    """``("maml,metasgd",)`` (how ``--config.algos=maml,metasgd`` arrives: ml_collections reads a
    tuple of strings as one string) -> ``("maml", "metasgd")``."""
    if isinstance(values, str):
        values = (values,)
    return tuple(n.strip() for v in values for n in str(v).split(",") if n.strip())


def check_choice(flag: str, value: str, allowed) -> str:
    """``value`` if in ``allowed``, else ``ValueError`` naming ``flag`` and what is allowed."""
    if value not in allowed:
        raise ValueError(f"{flag}={value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def format_mean_std(value: dict, n_seeds: int, width: int = 18) -> str:
    """``"0.7860 ± 0.0210"``, or the mean alone for one seed (no spread was measured)."""
    if not value:
        return f"{'':>{width}s}"
    if n_seeds < 2:
        return f"{value['mean']:9.4f}{'':9s}"
    return f"{value['mean']:9.4f} ± {value['std']:.4f}"


def config_value(cfg, field: str):
    """The value of config field ``field`` (``section/field`` for a section's:
    ``"metabandit/meta_lr"``); ``KeyError`` when there is none."""
    node = cfg
    for part in field.split("/"):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(field)
        node = node[part]
    return node


def set_config_value(cfg, field: str, value) -> None:
    """Set config field ``field`` (``section/field`` for a section's) to ``value``."""
    section, _, name = field.rpartition("/")
    (config_value(cfg, section) if section else cfg)[name] = value
