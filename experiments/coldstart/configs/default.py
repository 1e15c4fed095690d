"""Cold-start meta-learning on MovieLens-100K: the README main job (``make demo``).

How these values were chosen is recorded in BUILD_NOTES.md. Override any field on the command line,
e.g. ``--config.inner_lr=0.1 --config.algos=maml,metasgd --config.seeds=0``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # data (PROTOCOL.md)
    c.dataset = "ml-100k"
    c.data_dir = ""  # a folder of GroupLens or RecBole files; "" = the offline cache
    c.download = False  # fetch GroupLens' zip when the dataset is not cached
    c.protocol = "melu"
    c.seeds = (0, 1, 2)
    c.val_fraction = 0.15  # warm training users held out for early stopping and tuning
    # methods
    c.algos = ("maml", "fomaml", "reptile", "metasgd", "imaml")
    c.baselines = (
        "global_mean",
        "user_mean",
        "item_mean",
        "mf",
        "user_knn",
        "item_knn",
        "no_adapt",
        "finetune",
    )
    # model (a name of metarec.models.MODELS)
    c.model = "melu"
    c.embed_dim = 32
    c.hidden = (64, 64)
    c.residual = True
    c.use_item_id = True
    c.feature_dropout = 0.1
    # > 0: a CAVIA-style user-context vector (adapt "context" or "decision+context")
    c.context_dim = 0
    c.offset_prior = 2.0
    c.residual_bound = 4.0  # predictions within offset ± 4 (b * tanh(f / b)); 0 = unbounded
    # Transformer rater (model "transformer"); init_from: a pretraining run ("{seed}": per seed)
    c.init_from = ""
    c.tf_width = 64
    c.tf_depth = 2
    c.tf_heads = 2
    c.lora_rank = 0
    # meta-learning
    c.adapt = "decision"  # one of the model's adapt modes
    c.inner_steps = 5
    c.inner_lr = 0.05
    # per-learner overrides of inner_lr / inner_steps and algorithm options (metarec.meta.LEARNERS)
    c.learner_options = {
        "reptile": {"inner_lr": 0.05},
        "imaml": {"inner_lr": 0.05, "lam": 1.0, "cg_steps": 5},
    }
    c.meta_lr = 3e-3
    c.weight_decay = 1e-4
    c.clip_norm = 10.0
    c.meta_batch = 32
    c.chunk_size = 8  # tasks vmapped at once inside a meta-step; 0 = the whole meta-batch
    c.all_devices = False  # data-parallel meta-steps over every visible device
    c.epochs = 30
    c.patience = 8
    c.eval_chunk = 64
    c.k = 3  # nDCG@k
    # the conventionally trained network fine-tuned per user (baseline "finetune")
    c.finetune_lrs = (0.01, 0.03, 0.1)
    c.finetune_epochs = 30
    # bookkeeping
    c.ckpt_every = 50  # meta-steps between checkpoints inside an epoch (0: epoch ends only)
    c.keep_checkpoints = 2  # newest checkpoints kept per (seed, learner), plus the best
    c.log_every = 10  # meta-steps between metric records
    c.progress = True  # progress line with rate and ETA on stderr
    c.report = True  # report/report.md with tables and figures at the end
    c.adaptation_curves = True  # re-evaluate the first learner with curve_steps / curve_support
    c.curve_steps = (0, 1, 2, 5, 10)
    c.curve_support = (1, 3, 5, 10, 20)
    return c
