"""MovieLens readers, cleaning, cold-start scenarios, feature encoding and fixed-shape task batches.

Data flows one way: files -> :func:`load_dataset` (a name from :data:`DATASETS`; cleaned frames) ->
:func:`make_split` (per-scenario support/query sets) -> :class:`FeatureEncoder` (fixed-shape
:class:`Task` pytrees) -> jitted steps. Beyond memory: task shards on disk (:mod:`.shards`) streamed
as seeded, resumable meta-batches (:mod:`.stream`); synthetic ratings at scale in
:mod:`.synthetic_scale`.
"""

from metarec.data.encode import UNSEEN_YEARS, FeatureEncoder, FeatureSpec
from metarec.data.fetch import ensure_dataset
from metarec.data.movielens import RatingsData, clean, data_checksum
from metarec.data.readers import DataFormatError, read_any
from metarec.data.registry import (
    DATASETS,
    DatasetEntry,
    check_dataset,
    load_dataset,
    register_dataset,
)
from metarec.data.sampling import (
    RatingPool,
    drop_held_out,
    drop_query_ratings,
    hold_out_items,
    hold_out_queries,
    rating_pool,
    sample_user_sets,
    split_new_items,
)
from metarec.data.scenarios import (
    SCENARIOS,
    Split,
    UserSets,
    make_split,
    protocol_sets,
    split_validation,
)
from metarec.data.shards import ShardError, ShardSet, ShardWriter, open_shards, write_shards
from metarec.data.stream import LoaderState, MetaBatchStream, ShardTasks
from metarec.data.synthetic import make_synthetic_tasks
from metarec.data.tasks import (
    Examples,
    Task,
    check_finite_tasks,
    epoch_order,
    index_tasks,
    iterate_meta_batches,
    pad_tasks,
    pooled,
    pooled_tasks,
    stack_tasks,
)


def melu_scenarios(data: RatingsData, seed: int) -> dict[str, UserSets]:
    """The "melu" protocol's scenario sets for ``seed`` (shortcut for ``make_split(...).sets``)."""
    return make_split(data, seed, "melu").sets


def train_ratings(data: RatingsData, seed: int, protocol: str = "melu"):
    """The ratings training may see for ``seed`` (``make_split(...).train_ratings``)."""
    return make_split(data, seed, protocol).train_ratings


__all__ = [
    "DATASETS",
    "DataFormatError",
    "DatasetEntry",
    "Examples",
    "FeatureEncoder",
    "FeatureSpec",
    "LoaderState",
    "MetaBatchStream",
    "RatingPool",
    "RatingsData",
    "SCENARIOS",
    "ShardError",
    "ShardSet",
    "ShardTasks",
    "ShardWriter",
    "Split",
    "Task",
    "UNSEEN_YEARS",
    "UserSets",
    "check_dataset",
    "check_finite_tasks",
    "clean",
    "data_checksum",
    "drop_held_out",
    "drop_query_ratings",
    "ensure_dataset",
    "epoch_order",
    "hold_out_items",
    "hold_out_queries",
    "index_tasks",
    "iterate_meta_batches",
    "load_dataset",
    "make_split",
    "make_synthetic_tasks",
    "melu_scenarios",
    "open_shards",
    "pad_tasks",
    "pooled",
    "pooled_tasks",
    "protocol_sets",
    "rating_pool",
    "read_any",
    "register_dataset",
    "sample_user_sets",
    "split_new_items",
    "split_validation",
    "stack_tasks",
    "train_ratings",
    "write_shards",
]
