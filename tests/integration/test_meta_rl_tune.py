"""The meta-RL tuning path: validation users are training users held out of every fit, no test
user is read (poisoning every rating outside the training ratings leaves the validation simulator
unchanged), and the tune stage writes the config file the default config applies."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments.meta_rl import runner, settings
from experiments.meta_rl.configs import default
from experiments.tune import meta_rl as tune_rl
from experiments.tune.configs import meta_rl as tune_config
from metarec import data as mdata
from tests.conftest import write_ml100k


def _spec(data_dir, **kw):
    c = default.base_config()
    c.dataset, c.data_dir, c.seeds = "ml-100k", str(data_dir), (0,)
    c.n_train_users, c.n_test_users, c.n_val_users, c.n_items = 20, 4, 6, 12
    c.update(kw)
    return settings.resolve(c)


def _poison(data, keep):
    r = data.ratings.copy()
    r.loc[~keep, "rating"] = (6.0 - r.loc[~keep, "rating"]).astype(r["rating"].dtype)
    return dataclasses.replace(data, ratings=r)


def test_validation_simulator_reads_no_test_user(tmp_path, monkeypatch):
    d = write_ml100k(tmp_path / "ml-100k", n_users=120, n_items=60, min_per_user=20)
    spec = _spec(d)
    data = mdata.load_dataset("ml-100k", data_dir=d)
    split = mdata.make_split(data, 0, "melu")
    tr, items, ratings, mask = runner.validation_split(split.train_ratings, 6, 0, max_ratings=99)
    val_users = set(split.train_ratings["user_id"]) - set(tr["user_id"])
    assert len(val_users) == 6 and mask.sum(1).min() >= 1
    assert int(mask.sum()) == int(split.train_ratings["user_id"].isin(val_users).sum())

    def digest(d_):
        monkeypatch.setattr(mdata, "load_dataset", lambda *a, **k: d_)
        return runner.simulator_digest(runner.build_simulator(spec, 0, held_out="val"))

    pairs = set(zip(split.train_ratings["user_id"], split.train_ratings["item_id"]))
    in_train = np.array([p in pairs for p in zip(data.ratings["user_id"], data.ratings["item_id"])])
    assert 0 < (~in_train).sum()
    first = digest(data)
    # every rating of every test user (and of the warm users' test items) poisoned: no change
    assert digest(_poison(data, in_train)) == first
    # the same poison on the validation users' ratings moves it: the check can fail
    assert digest(_poison(data, ~data.ratings["user_id"].isin(val_users).to_numpy())) != first
    # and the test path does read the test users
    monkeypatch.setattr(mdata, "load_dataset", lambda *a, **k: data)
    test_sim = runner.build_simulator(spec, 0, held_out="test")
    assert test_sim.report["n_test_users"] == 4


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_tune_stage_writes_the_config_the_default_applies(tmp_path):
    cfg = tune_config.get_config()
    b = cfg.base
    b.dataset, b.n_train_users, b.n_val_users, b.n_items = "synthetic", 16, 4, 8
    b.env.horizon, b.env.history_len, b.adapt_episodes, b.eval_episodes = 3, 2, (0, 1, 2), 1
    b.metabandit.num_iterations, b.metabandit.meta_batch = 3, 2
    cfg.seeds, cfg.episodes, cfg.references = (0,), (1, 2), ("random",)
    cfg.spaces = {
        "metabandit": {"metabandit/trial_episodes": "choice:1"},  # one trial: compiles
        "linucb": {"bandits/linucb/alpha": "choice:0.05,3.0", "bandits/linucb/lam": "choice:2.0"},
    }
    cfg.write_config = str(tmp_path / "tuned.json")
    out = tune_rl.main(cfg, str(tmp_path / "wd"))
    # a bandit is tuned (every grid point) but never the recommended method
    assert out["recommended"] == "metabandit" and len(out["trials"]["metabandit"]) == 1
    assert len(out["trials"]["linucb"]) == 2
    best = out["trials"]["metabandit"][0]
    assert best["objective"] == -np.mean([best["val_ctr"][1], best["val_ctr"][2]])
    assert set(out["references_validation"]) == {"random", "oracle"}
    written = json.loads((tmp_path / "tuned.json").read_text())
    assert "no test user" in written["provenance"]["selected_on"]
    c = default.apply_tuned(default.base_config(), str(tmp_path / "tuned.json"))
    assert c.metabandit.trial_episodes == best["point"]["metabandit/trial_episodes"]
    assert c.recommended == "metabandit"
    # the main run uses the tuned bandit constants: they reach its bandit, and evaluating the
    # applied config on the validation users gives the tuned trial's CTR
    lin = out["trials"]["linucb"][0]
    assert c.bandits.linucb.alpha == lin["point"]["bandits/linucb/alpha"]
    assert c.bandits.linucb.lam == 2.0 != default.base_config().bandits.linucb.lam
    c.update({k: v for k, v in b.items() if k not in ("bandits", "metabandit", "meta")})
    c.methods = ("linucb",)
    spec = settings.resolve(c)
    assert settings.library_configs(spec).bandits["linucb"] == {
        "alpha": c.bandits.linucb.alpha,
        "lam": 2.0,
    }
    again = runner.run_on_simulators(spec, tune_rl.prepare(b, (0,)))[0]["curves"]["linucb"]["ctr"]
    assert {n: again[n] for n in (1, 2)} == {n: lin["val_ctr"][n] for n in (1, 2)}
    other = out["trials"]["linucb"][1]["val_ctr"]
    assert other != lin["val_ctr"]  # the constants matter: the check can fail
