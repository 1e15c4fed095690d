"""The large-model comparison on ml-100k, seed 0: small enough for a few minutes on a 2-core CPU.

The data, MeLU and meta-learning fields mean what they mean in the cold-start experiment (their
defaults come from ``experiments/coldstart/configs/default.py``; ``adapt`` is the MeLU reference's
adapt mode); ``encoder`` and ``pretrain`` are the sections of the pretraining experiment
(``experiments/pretrain/configs/default.py``); ``tf_*``, ``lora_rank``, ``item_dim`` and
``head_hidden`` shape the Transformer rater.
"""

import ml_collections

from experiments.coldstart.configs import default as coldstart
from experiments.pretrain.configs import default as pretrain

# fields taken over from the cold-start experiment, with its defaults
COLDSTART_FIELDS = (
    "dataset",
    "data_dir",
    "download",
    "protocol",
    "val_fraction",
    "embed_dim",
    "hidden",
    "residual",
    "use_item_id",
    "feature_dropout",
    "context_dim",
    "offset_prior",
    "residual_bound",
    "adapt",
    "meta_lr",
    "weight_decay",
    "clip_norm",
    "chunk_size",
    "all_devices",
    "eval_chunk",
    "k",
    "finetune_lrs",
    "lora_rank",
)


def get_config() -> ml_collections.ConfigDict:
    base = coldstart.base_config()
    c = ml_collections.ConfigDict({name: base[name] for name in COLDSTART_FIELDS})
    c.seeds = (0,)
    # methods (names in experiments.large_model.pipeline.METHODS)
    c.methods = ("melu_maml", "tf_scratch_maml", "tf_pre_finetune", "tf_pre_maml")
    # meta-learning (every method)
    c.epochs = 8
    c.patience = 4
    c.inner_steps = 3
    c.inner_lr = 0.05
    c.meta_batch = 32
    # the history encoder and its masked-item pretraining (per seed, on the training users)
    c.encoder = pretrain.encoder_config()
    c.pretrain = pretrain.pretrain_config()
    c.init_from = ""  # a pretraining run to load instead ("{seed}" is filled with each seed)
    # the Transformer rater
    c.tf_adapt = "head"  # parameters adapted per user: head | lora | head+last_block | all
    c.item_dim = 32
    c.head_hidden = (64, 32)
    c.rank_k = 10  # next-item ranking: HR / recall / nDCG at this k
    return c
