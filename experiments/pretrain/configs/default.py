"""Masked-item pretraining of the history encoder on ml-100k's "melu" split, seed 0.

``encoder`` holds the :class:`metarec.models.transformer.EncoderConfig` fields (``num_items`` comes
from the split's item vocabulary), ``pretrain`` the
:class:`metarec.training.pretrain.PretrainConfig` fields (its seed is the split ``seed``) plus
``val_fraction``. The large-model comparison reuses both sections.
"""

import ml_collections


def encoder_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.max_len = 100  # longest history (most recent ratings kept)
    c.width = 64
    c.depth = 2  # Transformer blocks
    c.heads = 2  # attention heads (divide width)
    c.mlp_ratio = 4
    c.dropout_rate = 0.1
    c.causal = False
    c.rating_levels = 5
    return c


def pretrain_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mask_prob = 0.2  # fraction of real positions replaced by [MASK]
    c.last_prob = 0.1  # probability that a sequence has only its last item masked
    c.num_negatives = 0  # 0 = full softmax over the catalogue; else sampled-softmax negatives
    c.epochs = 30
    c.batch_size = 64
    c.lr = 2e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    c.weight_decay = 0.01
    c.warmup_frac = 0.05
    c.clip_norm = 1.0
    c.val_fraction = 0.1  # training users whose last item is held out for next-item evaluation
    return c


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "ml-100k"  # a name in metarec.data.DATASETS
    c.data_dir = ""  # folder with GroupLens or RecBole files; "" = the cache / the recbole wheel
    c.download = False  # fetch GroupLens' zip into the cache when the dataset is not there
    c.protocol = "melu"  # cold-start protocol whose training users are used (melu | time)
    c.seed = 0  # split seed; must match the meta-learning run that loads the checkpoint
    # the cold-start run's val_fraction: its validation users' query ratings are never pretrained on
    c.coldstart_val_fraction = 0.15
    c.encoder = encoder_config()
    c.pretrain = pretrain_config()
    return c
