"""Flax models (pure ``init_fn`` / ``apply_fn`` pairs over plain parameter pytrees)."""

from metarec.models.melu import MeLU, adapt_filter, adapt_mask, make_melu

__all__ = ["MeLU", "adapt_filter", "adapt_mask", "make_melu"]
