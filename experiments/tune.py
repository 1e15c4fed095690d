"""Choose hyper-parameters on validation users (never on test scenarios): grid search for one algorithm.

  python -m experiments.tune --algo=maml --grid=inner_lr=0.01:0.05:0.1,meta_lr=0.001:0.003 --seeds=0 --workdir=runs/tune

Writes tune.json (rows sorted by validation MAE, best first) into --workdir.
"""

import json
import os

from absl import app, flags

from metarec import coldstart, tuning

FLAGS = flags.FLAGS
flags.DEFINE_enum("algo", "maml", list(coldstart.META_ALGOS), "Meta-learner to tune.")
flags.DEFINE_string("grid", "inner_lr=0.01:0.05:0.1,meta_lr=0.001:0.003",
                    "Comma list of field=v1:v2:... over coldstart.default_config() fields.")
flags.DEFINE_list("seeds", ["0"], "Seeds whose validation users are averaged.")
flags.DEFINE_list("set", [], "Fixed overrides field=value (e.g. epochs=20,adapt=all).")
flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m"], "MovieLens variant.")
flags.DEFINE_string("data_dir", None, "Folder with MovieLens files.")
flags.DEFINE_string("workdir", "runs/tune", "Where tune.json goes.")


def _parse_value(field, text, default):
    kind = type(default)
    try:
        if kind is bool:
            return text.lower() in ("1", "true", "yes")
        if kind is list:
            return [type(default[0])(v) for v in text.split("/")] if default else text.split("/")
        return kind(text)
    except ValueError:
        raise app.UsageError(f"{field}={text!r}: expected a {kind.__name__}")


def main(argv):
    del argv
    cfg = coldstart.default_config()
    cfg.dataset, cfg.data_dir = FLAGS.dataset, FLAGS.data_dir or ""
    for item in FLAGS.set:
        field, _, text = item.partition("=")
        if field not in cfg:
            raise app.UsageError(f"--set: unknown field {field!r}; fields: {', '.join(sorted(cfg.keys()))}")
        cfg[field] = _parse_value(field, text, cfg[field])
    grid = {}
    for item in FLAGS.grid.split(","):
        field, _, text = item.partition("=")
        if field not in cfg or not text:
            raise app.UsageError(f"--grid: bad entry {item!r}; use field=v1:v2 with fields of default_config()")
        grid[field] = [_parse_value(field, t, cfg[field]) for t in text.split(":")]
    rows = tuning.grid_search(cfg, grid, algo=FLAGS.algo, seeds=[int(s) for s in FLAGS.seeds])
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "tune.json"), "w") as f:
        json.dump({"algo": FLAGS.algo, "grid": grid, "fixed": FLAGS.set, "seeds": FLAGS.seeds, "rows": rows}, f, indent=1)
    print("best:", rows[0])


if __name__ == "__main__":
    app.run(main)
