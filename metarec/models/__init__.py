"""Flax models (pure ``init_fn`` / ``apply_fn`` pairs over plain parameter pytrees) and the MODELS
registry the cold-start pipeline builds them from."""

from metarec.models.melu import MeLU, adapt_filter, adapt_mask, make_melu
from metarec.models.registry import MODELS, ModelEntry, get_model

__all__ = ["MODELS", "MeLU", "ModelEntry", "adapt_filter", "adapt_mask", "get_model", "make_melu"]
