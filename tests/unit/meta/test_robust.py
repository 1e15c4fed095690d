"""APR-style embedding attacks and adversarial meta-training (metarec.meta.robust) on the hybrid
model as the recommended method runs it: frozen MF item tables, Meta-SGD with one damped-Newton
step on the user vector and bias, neighbour features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarec.data.encode import FeatureSpec
from metarec.data.tasks import Examples, Task
from metarec.meta import learners, robust
from metarec.meta.inner import scaled_sse
from metarec.meta.step import make_meta_step
from metarec.models import hybrid

SPEC = FeatureSpec(user_vocab=(8, 3, 5, 10), item_vocab=(6, 20), n_genres=4)
DIM = 3
LOSS = scaled_sse(10.0)


def _examples(rng, n, n_real):
    items = rng.integers(1, 15, n)
    x = {
        "user": jnp.asarray(np.tile(rng.integers(0, [8, 3, 5, 10]), (n, 1)), jnp.int32),
        "item": jnp.asarray(np.stack([rng.integers(0, 6, n), items], 1), jnp.int32),
        "genres": jnp.asarray(rng.integers(0, 2, (n, 4)), jnp.float32),
        "offset": jnp.full((n,), 3.5, jnp.float32),
        "nbr": jnp.asarray(rng.uniform(1, 5, (n, 2)), jnp.float32),
    }
    y = jnp.asarray(rng.integers(1, 6, n), jnp.float32)
    mask = jnp.asarray(np.arange(n) < n_real, jnp.float32)
    return Examples(x=x, y=y, mask=mask)


def make_task(seed):
    rng = np.random.default_rng(seed)
    return Task(support=_examples(rng, 12, 9), query=_examples(rng, 6, 6), user=jnp.int32(seed))


def batch(n):
    tasks = [make_task(s) for s in range(n)]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *tasks)


def build(freeze=True, seed=0):
    init, apply = hybrid.make_hybrid(
        SPEC, dim=DIM, embed_dim=4, freeze_tables=freeze, n_nbr=2, id_dropout=0.3
    )
    rng = np.random.default_rng(seed)
    rows = np.arange(1, 15)
    params = hybrid.with_item_tables(
        init(jax.random.PRNGKey(seed)),
        rows,
        rng.normal(0, 0.3, len(rows)),
        rng.normal(0, 0.4, (len(rows), DIM)),
        3.6,
    )
    learner = learners.metasgd(
        apply, LOSS, inner_steps=1, inner_lr=0.5, newton=5.0, adapt_mask=hybrid.adapt_filter("user")
    )
    return learner, apply, learner.init(params)


@pytest.fixture(scope="module")
def models():
    frozen, apply_f, meta = build(True)
    free, apply_u, _ = build(False)
    return frozen, apply_f, free, apply_u, meta


def _attack(models, method, **kw):
    _, _, free, apply_u, _ = models
    return robust.make_attack(free, apply_u, LOSS, method=method, **kw)


def test_the_attack_gradient_through_the_frozen_model_is_zero_and_through_the_free_one_not(models):
    frozen, apply_f, free, apply_u, meta = models
    task = make_task(0)
    tables = robust.selected(meta.params, robust.table_mask(meta.params))
    zero = [jnp.zeros_like(t) for t in tables]
    for lrn, ap, nonzero in ((frozen, apply_f, False), (free, apply_u, True)):
        f = robust.perturbed_loss(lrn, ap, LOSS)
        g = jax.jit(jax.grad(lambda d, f=f: f(meta, task, d)))(zero)
        norm = float(optax.tree.norm(g))
        assert (norm > 1e-3) if nonzero else (norm == 0.0)
    # same forward values
    np.testing.assert_array_equal(
        robust.perturbed_loss(frozen, apply_f, LOSS)(meta, task, zero),
        robust.perturbed_loss(free, apply_u, LOSS)(meta, task, zero),
    )


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_attacks_increase_the_loss_pgd_beats_fgsm_and_stay_in_the_ball(models):
    *_, meta = models
    f = jax.jit(robust.perturbed_loss(models[2], models[3], LOSS))
    fgsm = jax.jit(_attack(models, "fgsm"))
    attacks = {
        start: jax.jit(_attack(models, "pgd", steps=5, start=start)) for start in robust.STARTS
    }
    tables = robust.selected(meta.params, robust.table_mask(meta.params))
    zero = [jnp.zeros_like(t) for t in tables]
    for eps in (0.1, 0.5):
        r = robust.radii(tables, eps)
        for seed in range(3):
            task = make_task(seed)
            clean = f(meta, task, zero)
            d_f, l_f = fgsm(meta, task, eps)
            assert float(l_f) > float(clean)
            np.testing.assert_allclose(l_f, f(meta, task, d_f), rtol=1e-5)
            for start, atk in attacks.items():
                d, l = atk(meta, task, eps)
                assert float(l) > float(clean), start
                np.testing.assert_allclose(l, f(meta, task, d), rtol=1e-5)
                for di, ri in zip(d + d_f, r + r):
                    assert float(jnp.max(jnp.linalg.norm(di, axis=-1))) <= float(ri) * (1 + 1e-5)
            # eps = 0: no perturbation, the clean loss
            for atk in (fgsm, attacks["fgsm"]):
                d0, l0 = atk(meta, task, 0.0)
                assert all(float(jnp.max(jnp.abs(di))) == 0.0 for di in d0)
                np.testing.assert_allclose(l0, clean, rtol=1e-6)
            # PGD from the FGSM start keeps the best iterate: never weaker than FGSM
            assert float(attacks["fgsm"](meta, task, eps)[1]) >= float(l_f)
    # FGSM puts every row the task reads on its ball's surface, and leaves the others alone
    task = make_task(0)
    d_f, _ = fgsm(meta, task, 0.5)
    r = robust.radii(tables, 0.5)
    norms = np.asarray(jnp.linalg.norm(d_f[1], axis=-1))  # item_factors
    read = np.unique(
        np.concatenate(
            [
                np.asarray(ex.x["item"][:, 1])[np.asarray(ex.mask) > 0]
                for ex in (task.support, task.query)
            ]
        )
    )
    np.testing.assert_allclose(norms[read], float(r[1]), rtol=1e-5)
    assert np.all(norms[np.setdiff1d(np.arange(len(norms)), read)] == 0)


def test_relative_radius_is_eps_times_the_rms_row_norm():
    t = jnp.asarray([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    (r,) = robust.radii([t], 0.5)
    np.testing.assert_allclose(r, 0.5 * np.sqrt((25 + 1) / 2), rtol=1e-6)
    (r,) = robust.radii([t], 0.5, relative=False)
    assert float(r) == 0.5


@pytest.mark.slow
def test_eps_zero_is_the_clean_loss_and_jit_equals_no_jit(models):
    *_, meta = models
    task = make_task(1)
    f = robust.perturbed_loss(models[2], models[3], LOSS)
    tables = robust.selected(meta.params, robust.table_mask(meta.params))
    clean = f(meta, task, [jnp.zeros_like(t) for t in tables])
    for method in ("fgsm", "pgd"):
        atk = _attack(models, method, steps=3)
        d, l = atk(meta, task, 0.0)
        assert float(l) == float(clean)
        assert all(float(jnp.max(jnp.abs(di))) == 0.0 for di in d)
        d_j, l_j = jax.jit(atk)(meta, task, 0.3)
        d_n, l_n = atk(meta, task, 0.3)
        np.testing.assert_allclose(l_j, l_n, rtol=1e-5)
        for a, b in zip(d_j, d_n):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_attacked_predict_vmaps_and_matches_the_per_task_attack(models):
    frozen, apply_f, free, apply_u, meta = models
    atk = _attack(models, "pgd", steps=3)
    fn = robust.make_attacked_predict(frozen, apply_f, atk)
    tasks = batch(3)
    out = fn(meta, tasks, 0.4)
    clean = fn(meta, tasks, 0.0)
    for i in range(3):
        task = jax.tree_util.tree_map(lambda a, i=i: a[i], tasks)
        np.testing.assert_allclose(out["loss"][i], atk(meta, task, 0.4)[1], rtol=1e-5)
        phi = frozen.adapt(meta, task.support)
        np.testing.assert_allclose(clean["pred"][i], apply_f(phi, task.query.x), atol=1e-5)
    assert float(jnp.mean(out["loss"])) > float(jnp.mean(clean["loss"]))


def test_adversarial_learner_with_eps_or_lam_zero_is_the_base_learner(models):
    frozen, apply_f, free, apply_u, meta = models
    task, key = make_task(2), jax.random.PRNGKey(3)
    base = jax.jit(frozen.task_grad)(meta, task, key)
    for kw in ({"eps": 0.0, "lam": 0.5}, {"eps": 0.3, "lam": 0.0}):
        adv = robust.adversarial(
            frozen, apply_f, LOSS, attack_learner=free, attack_apply_fn=apply_u, **kw
        )
        got = jax.jit(adv.task_grad)(meta, task, key)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(base)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # over 5 s per call in the default suite; CI runs `make test-slow` too
@pytest.mark.parametrize("where", ["both", "inner", "outer"])
def test_adversarial_learner_mixes_clean_and_adversarial_gradients(models, where):
    frozen, apply_f, free, apply_u, meta = models
    task, key = make_task(4), jax.random.PRNGKey(5)
    kw = dict(attack_learner=free, attack_apply_fn=apply_u, where=where)
    full = robust.adversarial(frozen, apply_f, LOSS, eps=0.5, lam=1.0, **kw)
    half = robust.adversarial(frozen, apply_f, LOSS, eps=0.5, lam=0.5, **kw)
    clean, g_c = jax.jit(frozen.task_grad)(meta, task, key)
    adv, g_a = jax.jit(full.task_grad)(meta, task, key)
    mix, g_m = jax.jit(half.task_grad)(meta, task, key)
    assert float(adv) > float(clean)
    np.testing.assert_allclose(mix, 0.5 * clean + 0.5 * adv, rtol=1e-5)
    for m, c, a in zip(*(jax.tree_util.tree_leaves(t) for t in (g_m, g_c, g_a))):
        np.testing.assert_allclose(m, 0.5 * c + 0.5 * a, rtol=1e-4, atol=1e-6)
    # the frozen tables still get no meta-gradient
    assert float(jnp.max(jnp.abs(g_a.params["item_factors"]["embedding"]))) == 0.0
    if where != "both":
        return
    # and it plugs into the meta-step unchanged
    step = make_meta_step(half, optax.adam(1e-3), chunk_size=2)
    new, _, m = step(meta, optax.adam(1e-3).init(meta), batch(4), jnp.ones(4), key)
    assert bool(m["finite"]) and float(optax.tree.norm(new)) != float(optax.tree.norm(meta))


def test_bad_options_are_refused(models):
    frozen, apply_f, *_ = models
    with pytest.raises(ValueError, match="attack method"):
        robust.make_attack(frozen, apply_f, method="cw")
    with pytest.raises(ValueError, match="where"):
        robust.perturbed_loss(frozen, apply_f, where="query")
    with pytest.raises(ValueError, match="lam"):
        robust.adversarial(frozen, apply_f, eps=0.1, lam=2.0)
    with pytest.raises(ValueError, match="selects no"):
        robust.table_mask(models[4].params, r"^nothing$")
