"""The printed table of a cold-start run: every scenario x method x metric, mean ± std over seeds,
with the paired comparisons of the recommended method under it."""

from experiments.coldstart.build import TEST_SCENARIOS
from experiments.coldstart.paired import format_paired
from experiments.common import format_mean_std

TABLE_METRICS = ("mae", "rmse", "ndcg@3")


def _new_items(cfg: dict, method: str) -> str:
    """``", new items x S"`` where ``method`` predicts new items at a scale of its own."""
    entry = cfg.get("methods", {}).get(method, {})
    scale = entry.get("new_item_step_scale", cfg.get("new_item_step_scale", -1.0))
    return f", new items x {scale:g}" if scale >= 0 else ""


def format_table(res: dict, metrics=TABLE_METRICS) -> str:
    """One table: scenario x method x metric, mean ± sample std over seeds (the mean alone for one
    seed)."""
    seeds = res["seeds"]
    cfg = res["config"]
    spread = "mean ± sample std over seeds" if len(seeds) > 1 else "one seed, no spread measured"
    n_fit = [res["training"][str(seed)].get("n_fit_ratings") for seed in seeds]
    tasks = (
        "one fixed task per training user"
        if cfg.get("train_tasks") == "fixed"
        else "tasks drawn afresh every epoch from them"
    )
    methods = cfg["methods"]
    melu_lr = [  # each MeLU learner's own inner step size (a method may override the base's)
        f"{m} {methods.get(m, {}).get('inner_lr', cfg['inner_lr'])}"
        for m in cfg["algos"]
        if methods.get(m, {}).get("model", cfg["model"]) == "melu"
    ]
    lines = [
        f"{res['dataset']} / protocol {res['protocol']} / seeds {seeds} / "
        f"metrics averaged over users, {spread}; MAE/RMSE of predictions clipped to the scale, "
        "nDCG ranks raw scores",
        f"every method trains on the same ratings: warm training users' ratings minus the "
        f"validation users' query ratings ({', '.join(map(str, n_fit))} per seed); meta-learners "
        f"on {tasks}; MeLU learners adapt '{cfg['adapt']}' {cfg['inner_steps']} steps, lr "
        f"{', '.join(melu_lr) if melu_lr else cfg['inner_lr']}"
        + (f"; recommended method: {cfg['recommended']}" if cfg.get("recommended") else ""),
    ]
    scaled: dict[str, list[str]] = {}
    for seed in seeds:
        for m, x in (res["training"][str(seed)].get("step_scale") or {}).items():
            scaled.setdefault(m, []).append(f"{x:g}")
    if scaled:
        lines.append(
            "learned inner rates scaled by the validation users' choice (per seed): "
            + "; ".join(f"{m} x {'/'.join(v)}{_new_items(cfg, m)}" for m, v in scaled.items())
        )
    header = f"{'scenario':15s} {'method':12s}" + "".join(f"{m:>18s}" for m in metrics)
    lines += [header, "-" * len(header)]
    for s in TEST_SCENARIOS:
        n = res["scenarios"][s]["n_users"]
        for m, vals in res["results"][s].items():
            cells = [format_mean_std(vals.get(k), len(seeds)) for k in metrics]
            lines.append(f"{s + f' ({n})':15s} {m:12s}" + "".join(f"{c:>18s}" for c in cells))
        lines.append("")
    if res.get("paired"):
        lines.append(format_paired(res["paired"]))
    return "\n".join(lines)
