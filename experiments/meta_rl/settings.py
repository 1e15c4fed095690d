"""The meta-RL experiment's settings: the :data:`METHODS` registry and the checked, canonical form
of a config (:func:`resolve`), with the library dataclasses of its sections."""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from experiments.common import check_choice, split_names
from metarec import data as mdata
from metarec.rl import bandits
from metarec.rl import dqn as dqnlib
from metarec.rl import env as envlib
from metarec.rl import maml as mamllib
from metarec.rl import meta_bandit as mblib
from metarec.rl import ppo as ppolib
from metarec.rl import rl2 as rl2lib

#: every method the experiment can evaluate: name -> what it is
METHODS: dict[str, str] = {
    **{name: "per-user bandit, learns every step" for name in bandits.METHODS},
    "ppo": "PPO trained on all training users, no adaptation",
    "dqn": "DQN trained on all training users, greedy on Q, no adaptation",
    "ppo_scratch": "a fresh PPO per user, one update per adaptation episode",
    "maml": "MAML-RL: one inner step per adaptation episode",
    "fomaml": "first-order MAML-RL",
    "metasgd": "Meta-SGD: MAML-RL with meta-learned per-parameter inner learning rates",
    "metabandit": "meta-learned linear bandit: prior, item representations, exploration and "
    "satiation learned across users (RL^2 with a bandit-shaped memory)",
    "rl2": "RL^2: a GRU over the (item, click) history carried across episodes, meta-trained by "
    "REINFORCE across training users",
}
BANDIT_METHODS = tuple(bandits.METHODS)
META_METHODS = ("maml", "fomaml", "metasgd")
#: simulator sources besides the registered datasets (metarec.data.DATASETS)
SIMULATED = ("synthetic",)
REWARDS = ("click", "rating")
# config fields that say how a run is kept, not what it computes (not part of the recorded config)
RUN_SETTINGS = ("checkpoint_every", "keep_checkpoints")


def _ints(field: str, values) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in split_names(values))
    except ValueError:
        raise ValueError(f"--config.{field} must be integers, got {values!r}") from None
    if not out or min(out) < 0:
        raise ValueError(f"--config.{field} must be non-negative integers, got {values!r}")
    return out


class LibraryConfigs(NamedTuple):
    """The library settings of a resolved config."""

    env: envlib.EnvConfig
    ppo: ppolib.PPOConfig
    ppo_scratch: ppolib.PPOConfig
    dqn: dqnlib.DQNConfig
    meta: mamllib.MetaRLConfig
    metabandit: mblib.MetaBanditConfig
    rl2: rl2lib.RL2Config
    bandits: dict  # {bandit: {constant: value}}, the overrides of bandits.METHODS' classic values


def library_configs(spec) -> LibraryConfigs:
    """The library dataclasses of the ``env``, ``ppo``, ``ppo_scratch``, ``dqn``, ``meta``,
    ``metabandit`` and ``rl2`` sections of a config, and the bandits' constants."""
    return LibraryConfigs(
        env=envlib.EnvConfig(**spec.env),
        ppo=ppolib.PPOConfig(**spec.ppo),
        ppo_scratch=ppolib.PPOConfig(**spec.ppo_scratch),
        dqn=dqnlib.DQNConfig(**spec.dqn),
        meta=mamllib.MetaRLConfig(**spec.meta),
        metabandit=mblib.MetaBanditConfig(**spec.metabandit),
        rl2=rl2lib.RL2Config(**spec.rl2),
        bandits={m: dict(v) for m, v in dict(spec.get("bandits", {})).items()},
    )


def bandit_section() -> ml_collections.ConfigDict:
    """The config section of the bandits' own constants (``--config.bandits.linucb.alpha``), at
    the classic values of :data:`metarec.rl.bandits.METHODS`."""
    return ml_collections.ConfigDict(
        {m: {k: bandits.METHODS[m][k] for k in ks} for m, ks in bandits.TUNABLE.items()}
    )


def resolve(config) -> ml_collections.FrozenConfigDict:
    """The checked, canonical form of a config (``configs/default.py``): names split at commas and
    checked against their registries (the error lists the allowed values), ``data_dir`` "" -> None,
    ``meta.inner_params`` ``all`` -> None. Raises ``ValueError`` naming the field."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    c["dataset"] = check_choice("--config.dataset", c["dataset"], SIMULATED + tuple(mdata.DATASETS))
    c["data_dir"] = c["data_dir"] or None
    c["seeds"] = _ints("seeds", c["seeds"])
    c["methods"] = split_names(c["methods"])
    if not c["methods"]:
        raise ValueError(f"--config.methods is empty; allowed: {', '.join(METHODS)}")
    for name in c["methods"]:
        check_choice("--config.methods", name, METHODS)
    c["recommended"] = check_choice("--config.recommended", c["recommended"], METHODS)
    c["adapt_episodes"] = _ints("adapt_episodes", c["adapt_episodes"])
    c["reward"] = check_choice("--config.reward", c["reward"], REWARDS)
    for field in ("n_train_users", "n_test_users", "n_val_users"):
        if c[field] < 1:
            raise ValueError(f"--config.{field} must be >= 1, got {c[field]}")
    if c["eval_episodes"] < 1:
        raise ValueError(f"--config.eval_episodes must be >= 1, got {c['eval_episodes']}")
    inner_params = split_names(c["meta"]["inner_params"] or ("all",))
    c["meta"] = {**c["meta"], "inner_params": None if inner_params == ("all",) else inner_params}
    for field in RUN_SETTINGS:
        if c[field] < 1:
            raise ValueError(f"--config.{field} must be >= 1, got {c[field]}")
    spec = ml_collections.FrozenConfigDict(c)
    lib = library_configs(spec)
    lib.env.validate()
    _check_slates(spec, lib.env)
    for part in (lib.ppo, lib.ppo_scratch, lib.dqn, lib.meta, lib.metabandit, lib.rl2):
        part.validate()
    try:
        bandits.settings(BANDIT_METHODS, lib.bandits)
    except ValueError as e:
        raise ValueError(f"--config.bandits: {e}") from None
    return spec


#: methods that cannot show a slate: DQN's Q-values are per item, not per ranked list
NOT_SLATE_AWARE = ("dqn",)


def _check_slates(spec, env: envlib.EnvConfig) -> None:
    """With slates, a session must not run out of items and every method must rank lists."""
    if env.slate_size == 1:
        return
    if env.horizon * env.slate_size > spec.n_items:
        raise ValueError(
            f"--config.env.slate_size={env.slate_size} x --config.env.horizon={env.horizon} "
            f"shows more items than the catalogue's --config.n_items={spec.n_items} (no repeats)"
        )
    bad = [m for m in spec.methods if m in NOT_SLATE_AWARE]
    if bad:
        raise ValueError(
            f"--config.methods: {', '.join(bad)} cannot rank slates "
            f"(--config.env.slate_size={env.slate_size}); drop it or use slate_size=1"
        )
    if spec.recommended in NOT_SLATE_AWARE:
        raise ValueError(f"--config.recommended={spec.recommended} cannot rank slates")


def recorded_config(spec) -> dict:
    """The resolved config as recorded in ``rl_results.json`` / ``run.json`` (JSON-able)."""
    out = spec.to_dict()
    for field in RUN_SETTINGS:
        out.pop(field, None)
    return _lists(out)


def _lists(x):
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x
