"""The tuning path's cold-user validation (experiments/coldstart/tuning_sets.py) and the selection
objective that weighs it."""

import numpy as np
import pandas as pd
import pytest

from experiments.coldstart import build
from experiments.coldstart.configs import default as default_config
from experiments.tune import pipeline as tune
from experiments.tune.configs import default as tune_config
from metarec import data as mdata
from tests.integration.test_coldstart import _poison, _test_query_pairs


def _pairs(sets, prefix):
    m = getattr(sets, f"{prefix}_mask") > 0
    users = np.repeat(sets.user_id, m.sum(1))
    return set(zip(users.tolist(), getattr(sets, f"{prefix}_item")[m].tolist()))


def test_cold_users_lose_every_training_rating_and_no_rating_is_dropped(fixture_data):
    data, _ = fixture_data
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_cold_users = 0.5, 0.3
    sd = build.prepare_seed(data, 0, cfg, test=False)
    cold = sd.val_cold_sets
    assert cold.n_users > 0 and sd.val_cold.query.y.shape[0] == cold.n_users
    cold_ids = set(cold.user_id.tolist())
    # nobody has trained on them: not in the training ratings, the task pool or the other sets
    assert not sd.fit_ratings["user_id"].isin(cold_ids).any()
    assert not cold_ids & set(sd.draws["resample"](1).user_id.tolist())
    assert not cold_ids & set(sd.val_sets.user_id.tolist())
    assert not cold_ids & set(sd.train_sets.user_id.tolist())
    # the cold users are a seeded 0.3 of the non-validation training users
    plain = default_config.base_config()
    plain.val_new_items = 0.0
    before = build.prepare_seed(data, 0, plain, test=False)
    assert cold.n_users == round(0.3 * before.train_sets.n_users)
    assert cold_ids < set(before.train_sets.user_id.tolist())
    again = build.prepare_seed(data, 0, cfg, test=False)
    assert set(again.val_cold_sets.user_id.tolist()) == cold_ids
    # only their ratings of held-out items left their query sets, and those users with enough
    # of them are scored in the new-item set (the validation users' rule)
    by_user = dict(enumerate(before.train_sets.user_id.tolist()))
    orig = before.train_sets.select([k for k, u in by_user.items() if u in cold_ids])
    want, got = _pairs(orig, "query"), _pairs(cold, "query")
    trained_items = set(sd.fit_ratings["item_id"].tolist())
    assert got <= want and got and all(i not in trained_items for _, i in want - got)
    assert cold_ids & set(sd.val_new_sets.user_id.tolist())
    # the test path builds no stand-in and trains on them
    full = build.prepare_seed(data, 0, cfg)
    assert full.val_cold is None and full.val_cold_sets is None
    assert full.fit_ratings["user_id"].isin(cold_ids).any()
    # off (the default): no cold-user set
    assert default_config.base_config().val_cold_users == 0.0
    assert before.val_cold is None and before.val_cold_sets is None


def test_selection_objective_weighs_the_cold_user_validation():
    row = {"val_mae": 0.8, "val_ndcg@3": 0.7, "val_new_mae": 0.9, "val_new_ndcg@3": 0.6}
    row |= {"val_cold_mae": 0.75, "val_cold_ndcg@3": 0.65}
    got = tune.selection_objective(row, 3, 1.0, 0.5, 0.25)
    assert got == pytest.approx(0.25 * 0.1 + 0.5 * 0.3 + 0.25 * 0.1)
    assert tune.selection_objective(row, 3, 0.0, 0.0, 1.0) == pytest.approx(0.75)
    # weight 0: the cold-user entries are not read (a run without them has NaN there)
    nan_row = row | {"val_cold_mae": float("nan")}
    assert tune.selection_objective(nan_row, 3, 1.0, 0.5) == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)


@pytest.mark.parametrize(
    "cold_users,new_w,cold_w,message",
    [
        (0.0, 0.5, 0.25, "--config.cold_user_weight=0.25 needs a cold-user validation"),
        (0.15, 0.5, 0.75, "--config.new_item_weight + --config.cold_user_weight = 1.25"),
    ],
)
def test_the_tune_stage_refuses_weights_it_cannot_score(
    tmp_path, cold_users, new_w, cold_w, message
):
    cfg = tune_config.get_config()
    cfg.write_config = ""
    cfg.base.val_cold_users, cfg.new_item_weight, cfg.cold_user_weight = cold_users, new_w, cold_w
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        tune.main(cfg, str(tmp_path / "w"))


def test_val_cold_users_out_of_range_is_named():
    cfg = default_config.get_config()
    cfg.val_cold_users = 1.0
    with pytest.raises(ValueError, match=r"--config.val_cold_users must be in \[0, 1\), got 1.0"):
        build.validate_config(cfg)


@pytest.mark.parametrize("rebuild", [False, True])
def test_the_cold_user_validation_reads_no_test_rating(fixture_data, rebuild):
    """Every rating outside the split's training ratings poisoned: the tuning path's sets with
    the cold-user validation on (and the tasks rebuilt after the hold-out or not) are the same."""
    data, _ = fixture_data
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_cold_users = 0.5, 0.3
    cfg.val_rebuild_tasks = rebuild
    split = mdata.make_split(data, 0, cfg.protocol)
    train_pairs = set(zip(split.train_ratings["user_id"], split.train_ratings["item_id"]))
    in_train = np.array(
        [p in train_pairs for p in zip(data.ratings["user_id"], data.ratings["item_id"])]
    )
    a = build.prepare_seed(data, 0, cfg, test=False)
    b = build.prepare_seed(_poison(data, in_train), 0, cfg, test=False)
    for name in ("val_cold_sets", "val_new_sets", "val_sets", "train_sets"):
        for f in ("user_id", "support_item", "support_rating", "query_item", "query_rating"):
            np.testing.assert_array_equal(
                getattr(getattr(a, name), f), getattr(getattr(b, name), f)
            )
    assert a.fit_ratings.equals(b.fit_ratings)


def test_val_new_support_is_named_and_an_empty_stand_in_is_refused(fixture_data):
    cfg = default_config.get_config()
    cfg.val_new_support = "query"
    with pytest.raises(ValueError, match=r"--config.val_new_support='query'; allowed: new, known"):
        build.validate_config(cfg)
    # the fixture's users rate at most 60 items: with a tenth of the items held out nobody has the
    # 13 ratings of them a melu task needs
    data, _ = fixture_data
    cfg = default_config.base_config()
    with pytest.raises(ValueError, match="new-item validation of seed 0 is empty.*val_new_items"):
        build.prepare_seed(data, 0, cfg, test=False)
    cfg.val_new_support = "known"
    assert build.prepare_seed(data, 0, cfg, test=False).val_new_sets.n_users > 0


def test_latest_stand_ins_hold_out_the_newest_items_and_the_latest_users(fixture_data):
    data, _ = fixture_data
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_cold_users, cfg.val_new_support = 0.2, 0.3, "known"
    plain = build.prepare_seed(data, 0, cfg, test=False)
    cfg.val_hold_out = "latest"
    sd = build.prepare_seed(data, 0, cfg, test=False)
    none = default_config.base_config()
    none.val_new_items = 0.0
    rated = build.prepare_seed(data, 0, none, test=False).fit_ratings
    # the cold users are as many as with the random rule, and the latest to arrive
    cold_ids = np.asarray(sd.val_cold_sets.user_id)
    assert len(cold_ids) == plain.val_cold_sets.n_users
    assert set(cold_ids) != set(plain.val_cold_sets.user_id.tolist())
    first = rated.groupby("user_id")["timestamp"].min()
    assert first.reindex(cold_ids).min() >= first.reindex(sd.train_sets.user_id).max()
    # the held-out items are the newest of those the other users rated
    years = pd.to_numeric(data.items.set_index("item_id")["year"], errors="coerce").fillna(-1)
    pool = set(rated.loc[~rated["user_id"].isin(cold_ids), "item_id"])
    kept = set(sd.fit_ratings["item_id"])
    held = sorted(pool - kept)
    assert len(held) == round(0.2 * len(pool))
    assert years.reindex(held).min() >= years.reindex(sorted(kept)).max()
    assert years.reindex(held).max() > years.reindex(sorted(pool)).min()  # not a flat fixture


def test_whole_years_stand_in_holds_out_whole_years_and_keeps_the_user_rule(fixture_data):
    data, _ = fixture_data
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_cold_users, cfg.val_new_support = 0.2, 0.3, "known"
    plain = build.prepare_seed(data, 0, cfg, test=False)
    cfg.val_whole_years = True
    sd = build.prepare_seed(data, 0, cfg, test=False)
    # the cold users still follow val_hold_out (random, as the melu protocol's new users are)
    assert sd.val_cold_sets.user_id.tolist() == plain.val_cold_sets.user_id.tolist()
    # the held-out items are every item of the newest years: no kept item shares a year with one
    none = default_config.base_config()
    none.val_new_items, none.val_cold_users = 0.0, 0.3
    pool = set(build.prepare_seed(data, 0, none, test=False).fit_ratings["item_id"])
    kept = set(sd.fit_ratings["item_id"])
    held = sorted(pool - kept)
    years = pd.to_numeric(data.items.set_index("item_id")["year"], errors="coerce").fillna(-1)
    assert held and (len(held) <= 0.2 * len(pool) or years.reindex(held).nunique() == 1)
    assert years.reindex(held).min() > years.reindex(sorted(kept)).max()
    # so the held-out items' years are unseen by the encoder and take the newest training year
    vocab = sd.encoder.vocabs["year"]
    held_years = sorted(set(years.reindex(held).astype(int).astype(str)))
    assert not set(held_years) & set(vocab.tokens)
    newest = str(int(years.reindex(sorted(kept)).max()))
    assert (vocab.encode(held_years) == vocab.encode([newest])[0]).all()


def test_val_hold_out_is_named():
    cfg = default_config.base_config()
    cfg.val_hold_out = "oldest"
    with pytest.raises(ValueError, match="--config.val_hold_out='oldest'; allowed: random, latest"):
        build.validate_config(cfg)


def test_rebuilt_tasks_keep_the_protocols_query_size_and_lose_no_rating(fixture_data):
    """``val_rebuild_tasks``: after the item hold-out the validation and cold users' tasks are the
    protocol's rule applied to the ratings they keep (full query sets); the validation users'
    support ratings stay training ratings, their query ratings do not, and no other training
    rating changes."""
    data, _ = fixture_data
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_cold_users, cfg.val_new_support = 0.2, 0.3, "known"
    cfg.val_whole_years = True
    plain = build.prepare_seed(data, 0, cfg, test=False)
    cfg.val_rebuild_tasks = True
    sd = build.prepare_seed(data, 0, cfg, test=False)
    held = set(plain.split.train_ratings["item_id"]) - set(plain.fit_ratings["item_id"])
    assert held and set(sd.fit_ratings["item_id"]) == set(plain.fit_ratings["item_id"])
    # without the rebuild the hold-out shortened query sets; with it every one has the full 10
    assert plain.val_sets.query_mask.sum(1).min() < 10
    np.testing.assert_array_equal(sd.val_sets.query_mask.sum(1), 10)
    np.testing.assert_array_equal(sd.val_cold_sets.query_mask.sum(1), 10)
    # the rule on the ratings the users keep: every warm rating of theirs on a kept item
    before = build.prepare_seed(data, 0, default_config.base_config(), test=True)
    warm = before.split.train_ratings
    for sets, orig in ((sd.val_sets, before.val_sets), (sd.val_cold_sets, plain.val_cold_sets)):
        assert set(sets.user_id.tolist()) <= set(orig.user_id.tolist())
        kept = warm[warm["user_id"].isin(orig.user_id) & ~warm["item_id"].isin(held)]
        want = mdata.protocol_sets(kept, "melu", 0, n_query=10)
        for f in ("user_id", "query_item", "query_rating"):
            np.testing.assert_array_equal(getattr(sets, f), getattr(want, f))
        assert _pairs(sets, "support") == _pairs(want, "support")
    # training ratings: validation support in, validation query out, cold users out, and the
    # other users' ratings exactly as without the rebuild
    fit = set(zip(sd.fit_ratings["user_id"], sd.fit_ratings["item_id"]))
    assert _pairs(sd.val_sets, "support") <= fit and not _pairs(sd.val_sets, "query") & fit
    assert not sd.fit_ratings["user_id"].isin(sd.val_cold_sets.user_id).any()
    val_ids = before.val_sets.user_id

    def others(frame):
        return frame[~frame["user_id"].isin(val_ids)].reset_index(drop=True)

    pd.testing.assert_frame_equal(others(sd.fit_ratings), others(plain.fit_ratings))
    mine = set(
        zip(
            *[
                warm.loc[warm["user_id"].isin(val_ids) & ~warm["item_id"].isin(held), c]
                for c in ("user_id", "item_id")
            ]
        )
    )
    assert {p for p in fit if p[0] in set(val_ids.tolist())} == mine - _pairs(sd.val_sets, "query")
    # the new-item stand-in is untouched; the test path builds no stand-in
    np.testing.assert_array_equal(sd.val_new_sets.query_item, plain.val_new_sets.query_item)
    full = build.prepare_seed(data, 0, cfg)
    assert full.fit_ratings.equals(before.fit_ratings)


def test_an_empty_rebuilt_stand_in_is_refused(fixture_data):
    # with nine tenths of the items held out no validation user keeps the 13 ratings of a melu task
    data, _ = fixture_data
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_new_support, cfg.val_rebuild_tasks = 0.9, "known", True
    with pytest.raises(
        ValueError, match="validation users of seed 0 keep too few ratings.*val_rebuild_tasks=False"
    ):
        build.prepare_seed(data, 0, cfg, test=False)


def test_a_separate_new_item_model_leaves_the_warm_and_cold_users_every_item(fixture_data):
    """``val_new_model="separate"``: the new-item stand-in and its training data are the shared
    path's; the validation and cold users' data are the tuning path's with no item held out, so
    their query sets hold the held-out items too, as warm_test's and user_cold's hold new years'
    known items; neither reads a test rating."""
    data, _ = fixture_data
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_cold_users, cfg.val_new_support = 0.2, 0.3, "known"
    cfg.val_whole_years = cfg.val_rebuild_tasks = True
    shared = tune.prepare_tuning_seed(data, 0, cfg)
    assert shared.val_new_data is None
    cfg.val_new_model = "separate"
    sd = tune.prepare_tuning_seed(data, 0, cfg)
    new = sd.val_new_data
    assert sd.val_new is None and new.val_new_data is None
    for f in ("user_id", "support_item", "query_item", "query_rating"):
        np.testing.assert_array_equal(getattr(new.val_new_sets, f), getattr(shared.val_new_sets, f))
    assert new.fit_ratings.equals(shared.fit_ratings)
    every_item = default_config.base_config()
    every_item.val_cold_users, every_item.val_new_items = 0.3, 0.0
    plain = build.prepare_seed(data, 0, every_item, test=False)
    for name in ("val_sets", "val_cold_sets"):
        for f in ("user_id", "support_item", "query_item", "query_rating"):
            np.testing.assert_array_equal(
                getattr(getattr(sd, name), f), getattr(getattr(plain, name), f)
            )
    held = set(shared.split.train_ratings["item_id"]) - set(shared.fit_ratings["item_id"])
    assert held and held <= set(sd.fit_ratings["item_id"])
    assert np.isin(sd.val_sets.query_item[sd.val_sets.query_mask > 0], list(held)).any()
    # no warm_test or new user is trained on or scored (item_cold's users are training users)
    held_users = ("warm_test", "user_cold", "user_item_cold")
    test_users = set().union(*(sd.split.sets[k].user_id.tolist() for k in held_users))
    for part in (sd, new):
        assert not test_users & set(part.fit_ratings["user_id"])
        assert not test_users & set(part.val_sets.user_id.tolist())
    assert not test_users & set(sd.val_cold_sets.user_id.tolist())
    with pytest.raises(ValueError, match=r"--config.val_new_model='both'; allowed: shared, sep"):
        cfg.val_new_model = "both"
        build.validate_config(cfg)


def _same_sets(a, b) -> bool:
    """Whether two tuning-path ``SeedData`` hold the same stand-ins (absent in both, or equal)."""
    fields = ("user_id", "support_item", "support_rating", "query_item", "query_rating")
    names = ("val_cold_sets", "val_new_sets", "val_sets", "train_sets")
    return all(
        getattr(a, n) is None is getattr(b, n)
        or all(np.array_equal(getattr(getattr(a, n), f), getattr(getattr(b, n), f)) for f in fields)
        for n in names
    )


def _same_tuning_data(a, b) -> bool:
    """Whether two tuning-path ``SeedData`` hold the same stand-ins and training ratings."""
    return a.fit_ratings.equals(b.fit_ratings) and _same_sets(a, b)


def test_the_seal_keeps_every_seeds_test_query_ratings_out_of_the_tuning_path(fixture_data):
    """With ``val_seal_seeds`` no query rating of a test scenario under any of those seeds
    reaches a seed's tuning data: poisoning them all (and every rating outside this seed's
    training ratings) leaves it the same. Without the seal another seed's test query ratings are
    this seed's training ratings, so poisoning them moves it."""
    data, _ = fixture_data
    protocol = "melu"  # the fixture is too small for the time protocol's scenarios
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_cold_users = 0.3, 0.3
    cfg.val_rebuild_tasks = True
    seeds = (0, 1, 2)
    split = mdata.make_split(data, 0, protocol)
    train_pairs = set(zip(split.train_ratings["user_id"], split.train_ratings["item_id"]))
    in_train = np.array(
        [p in train_pairs for p in zip(data.ratings["user_id"], data.ratings["item_id"])]
    )
    queried = _test_query_pairs(data, seeds, protocol)
    others = np.array([p in queried for p in zip(data.ratings["user_id"], data.ratings["item_id"])])
    assert (in_train & others).any()  # another seed's test query ratings train seed 0
    poisoned = _poison(data, in_train & ~others)
    assert not _same_tuning_data(
        build.prepare_seed(data, 0, cfg, test=False),
        build.prepare_seed(poisoned, 0, cfg, test=False),
    )
    cfg.val_seal_seeds = seeds
    a = build.prepare_seed(data, 0, cfg, test=False)
    assert _same_tuning_data(a, build.prepare_seed(poisoned, 0, cfg, test=False))
    sealed = set(zip(a.split.train_ratings["user_id"], a.split.train_ratings["item_id"]))
    assert sealed == train_pairs - queried


def test_a_seal_with_nothing_to_drop_leaves_the_split_and_evaluation_ignores_it(fixture_data):
    """Sealing a seed against its own test scenarios drops nothing (they are never training
    ratings); the evaluation path never seals, and a bad seed list is one error line."""
    data, _ = fixture_data
    split = mdata.make_split(data, 1, "melu")
    assert build.seal_split(split, data, (1,)) is split
    rebuilt = mdata.protocol_sets(split.train_ratings, "melu", 1)
    for f in ("user_id", "support_item", "support_rating", "query_item", "query_rating"):
        np.testing.assert_array_equal(getattr(rebuilt, f), getattr(split.sets["warm_train"], f))
    cfg = default_config.base_config()
    plain = build.prepare_seed(data, 1, cfg)
    cfg.val_seal_seeds = (0, 1, 2)
    sealed = build.prepare_seed(data, 1, cfg)
    assert plain.fit_ratings.equals(sealed.fit_ratings)
    cfg.val_seal_seeds = (0, -1)
    with pytest.raises(ValueError, match=r"--config.val_seal_seeds must be seeds .* got \(0, -1\)"):
        build.validate_config(cfg)


def test_both_tune_stages_seal_every_seed_the_cold_start_experiment_evaluates():
    from experiments.tune.configs import time as time_tune

    for c in (tune_config.get_config(), time_tune.get_config()):
        assert tuple(c.base.val_seal_seeds) == tuple(default_config.base_config().seeds)
        assert tuple(c.seeds) == tuple(c.base.val_seal_seeds)


@pytest.mark.parametrize("new_model", ["shared", "separate"])
def test_validation_users_held_out_of_the_fit_keep_their_tasks(fixture_data, new_model):
    """``val_support_in_fit=False``: no rating of a validation user is fitted or drawn for
    meta-training, as no warm_test user's is; exactly their support ratings leave, every set is
    the default's, and a separate new-item model's data keeps them, as evaluation's model does."""
    data, _ = fixture_data
    cfg = default_config.base_config()
    cfg.val_new_items, cfg.val_cold_users, cfg.val_new_support = 0.2, 0.3, "known"
    cfg.val_whole_years = cfg.val_rebuild_tasks = True
    cfg.val_new_model = new_model
    before = tune.prepare_tuning_seed(data, 0, cfg)
    cfg.val_support_in_fit = False
    sd = tune.prepare_tuning_seed(data, 0, cfg)
    val_ids = set(sd.val_sets.user_id.tolist())
    mine = before.fit_ratings["user_id"].isin(val_ids)
    assert val_ids and mine.any()
    assert sd.fit_ratings.equals(before.fit_ratings[~mine].reset_index(drop=True))
    gone = before.fit_ratings[mine]
    assert set(zip(gone["user_id"], gone["item_id"])) == _pairs(sd.val_sets, "support")
    assert not val_ids & set(sd.draws["resample"](1).user_id.tolist())
    assert val_ids & set(before.draws["resample"](1).user_id.tolist())
    assert _same_sets(sd, before)
    if new_model == "separate":
        new, old = sd.val_new_data, before.val_new_data
        assert _same_tuning_data(new, old)
        assert new.fit_ratings["user_id"].isin(val_ids).any()
    # evaluation fits the validation users' support as before
    assert build.prepare_seed(data, 0, cfg).fit_ratings["user_id"].isin(val_ids).any()
