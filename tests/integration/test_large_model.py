"""The large-model comparison: its config is checked against the registries, maps onto the
cold-start pieces' config, and a tiny run produces every method's metrics and the ranking."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.large_model import pipeline
from experiments.large_model.configs import default


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("methods", ("melu_maml", "bogus"), "allowed: melu_maml, tf_scratch_maml"),
        ("methods", ("tf_pre_maml", "tf_pre_maml"), "more than once"),
        ("tf_adapt", "lora", "needs --config.lora_rank >= 1"),
        ("tf_adapt", "everything", "allowed: head, lora"),
        ("adapt", "lora", "--config.adapt='lora' for model melu"),
        ("rank_k", 0, "--config.rank_k must be >= 1"),
    ],
)
def test_config_errors_name_the_field(field, value, match):
    cfg = default.get_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        pipeline.validate_config(cfg)


def test_config_errors_of_sections_and_init_from():
    cfg = default.get_config()
    cfg.encoder.heads = 3
    with pytest.raises(ValueError, match="--config.encoder.width=64 must be divisible"):
        pipeline.validate_config(cfg)
    cfg = default.get_config()
    cfg.pretrain.epochs = 0
    with pytest.raises(ValueError, match="--config.pretrain.epochs=0: must be >= 1"):
        pipeline.validate_config(cfg)
    cfg = default.get_config()
    cfg.seeds, cfg.init_from = (0, 1), "runs/pretrain/seed0"
    with pytest.raises(ValueError, match="one seed's pretraining"):
        pipeline.validate_config(cfg)
    cfg.init_from = "runs/pretrain/seed{seed}"
    pipeline.validate_config(cfg)


def test_coldstart_config_takes_the_shared_fields():
    cfg = default.get_config()
    cfg.epochs, cfg.inner_lr, cfg.adapt, cfg.init_from = 3, 0.2, "all", "runs/x/seed{seed}"
    cs = pipeline.coldstart_config(cfg)
    assert (cs.epochs, cs.inner_lr, cs.adapt, cs.meta_batch) == (3, 0.2, "all", cfg.meta_batch)
    assert cs.model == "melu" and cs.init_from == ""  # the encoder is loaded by the comparison


@pytest.mark.slow
def test_tiny_run_reports_every_method(scenario_data):
    cfg = default.get_config()
    cfg.update(epochs=1, patience=1, inner_steps=1, meta_batch=8, embed_dim=8, hidden=(8,))
    cfg.update(item_dim=4, head_hidden=(8,), finetune_lrs=(0.1,), chunk_size=0)
    cfg.encoder.update(max_len=8, width=16, depth=1, heads=2)
    cfg.pretrain.update(epochs=1, batch_size=16)
    pipeline.validate_config(cfg)
    res = pipeline.run(cfg, data=scenario_data, log_fn=lambda m: None)
    for scenario, methods in res["results"].items():
        assert list(methods) == list(pipeline.METHODS), scenario
        assert all(np.isfinite(m["mae"]["mean"]) for m in methods.values())
    assert set(res["ranking"]) == set(pipeline.RANKED_SCENARIOS)
    assert "pretrain" in res["training"]["0"]["histories"]
    assert "ndcg@3" in pipeline.format_table(res)
