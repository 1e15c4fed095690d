"""Cold-start meta-learning on MovieLens-100K: the README main job (``make demo``).

How these values were chosen is recorded in BUILD_NOTES.md. Override any field on the command line,
e.g. ``--config.inner_lr=0.1 --config.algos=maml,metasgd --config.seeds=0``.
"""

import json
import os

import ml_collections

TUNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")


def get_config() -> ml_collections.ConfigDict:
    """The base config with the choices of the tune stage (``tuned.json``) applied."""
    return apply_tuned(base_config())


def apply_tuned(c: ml_collections.ConfigDict, path: str = TUNED) -> ml_collections.ConfigDict:
    """Set ``methods`` entries and ``recommended`` from a file written by ``experiments.tune``."""
    if os.path.exists(path):
        with open(path) as f:
            tuned = json.load(f)
        for name, entry in tuned["methods"].items():
            c.methods[name] = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        c.recommended = tuned["recommended"]
    return c


def base_config() -> ml_collections.ConfigDict:
    """The config before tuning: what the tune stage searches from."""
    c = ml_collections.ConfigDict()
    # data (PROTOCOL.md)
    c.dataset = "ml-100k"
    c.data_dir = ""  # a folder of GroupLens or RecBole files; "" = the offline cache
    c.download = False  # fetch GroupLens' zip when the dataset is not cached
    c.protocol = "melu"
    c.seeds = (0, 1, 2)
    c.val_fraction = 0.15  # warm training users held out for early stopping and tuning
    # tuning stage only: this fraction of the training items is held out of training (every
    # rating of them) and the validation users' ratings of them are the new-item validation, the
    # stand-in for the item-cold scenarios; evaluation (test scenarios) trains on every item
    c.val_new_items = 0.1
    # how that stand-in is built: "new" = support and query from the ratings of the held-out
    # items, by the protocol's rule (as item_cold and user_item_cold are built from new items'
    # ratings); "known" = the users adapt on their known items and are scored on held-out ones
    c.val_new_support = "new"
    # tuning stage only: this fraction of the other warm training users is held out of training
    # (every rating of them) and scored as new users, the stand-in for user_cold (0 = none)
    c.val_cold_users = 0.0
    # tuning stage only: which items and users those stand-ins hold out: "random" (a seeded
    # fraction) or "latest" (the newest items by release year, the users whose first training
    # rating is latest: the time protocol's new items and new users)
    c.val_hold_out = "random"
    # tuning stage only: True = the held-out items are whole release years instead, the newest
    # (at most val_new_items of the items, at least one year), as both protocols' new items are
    # every year from a cutoff on; the cold users still follow val_hold_out
    c.val_whole_years = False
    # tuning stage only: True = after the item hold-out, the validation and cold users' tasks are
    # built again by the protocol's rule from the ratings they keep (as the test scenarios are
    # built from known items' ratings), so their query sets keep the protocol's size; False = the
    # hold-out removes ratings from the tasks built before it
    c.val_rebuild_tasks = False
    # tuning stage only: "shared" = one model per trial and seed, trained with the new-item
    # stand-in's items held out, scores every stand-in; "separate" = that model scores the
    # new-item stand-in only, and a second one, trained on every training item as the test
    # scenarios' models are, scores the validation and cold users (whose query sets then hold
    # the held-out years' items too, as warm_test's and user_cold's do)
    c.val_new_model = "shared"
    # tuning stage only: False = the validation users' support ratings leave the training ratings
    # too (only their query ratings do otherwise), so none of their ratings is fitted, as none of
    # warm_test's users' is; with val_new_model="separate" the new-item stand-in's model keeps them
    c.val_support_in_fit = True
    # tuning stage only: every query rating of a test scenario under these seeds is dropped from
    # the tuning path (its training ratings and stand-ins), since one tuned config serves every
    # evaluated seed and another seed's training users include this seed's test users; () = none
    c.val_seal_seeds = ()
    # meta-training tasks: "resample" = one task per training user drawn afresh every epoch from
    # every training rating (metarec.data.sampling); "resample_support" = the same with each
    # user's query set held out once (a model's MF item tables are fitted without them, so the
    # query ratings of a training task are unseen, as a new user's are); "crossfit" = the same
    # with crossfit_folds held-out query sets per user, epoch e querying fold (e - 1) % folds and
    # training on kNN/MF features and item tables fitted without that fold's query ratings (more
    # distinct query ratings, none of them in its own features); "fixed" = the protocol's one
    # split per user; "resample_chrono" and "crossfit_chrono" = "resample" and "crossfit" with
    # tasks shaped as the time protocol's (the query a run of consecutive ratings in time, the
    # support the ratings right before it)
    c.train_tasks = "resample"
    c.crossfit_folds = 5
    c.task_min_support = 3  # a drawn task keeps at least this many support ratings
    # methods
    # the CF-containing meta-learner first (no_adapt and the adaptation curves use the
    # first), then the MeLU reference learners; fomaml, reptile, imaml run with --config.algos
    c.algos = ("cf_metasgd", "maml", "metasgd")
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
    # a release year never seen in training: "nearest" seen year, or "oov" (one untrained row)
    c.unseen_years = "nearest"
    c.residual_bound = 4.0  # predictions within offset ± 4 (b * tanh(f / b)); 0 = unbounded
    # hybrid model (metarec.models.hybrid): item side from an MF fitted on the training ratings
    c.cf_dim = 8  # MF factors (the item tables and the adapted user vector)
    c.cf_reg = 5.0  # the MF's L2 strength (the baseline "mf" uses the same form)
    c.cf_hidden = ()  # a residual MLP on top of the CF term; () = none
    c.id_dropout = 0.2  # item ids replaced by OOV during meta-training (trains the content path)
    c.cf_freeze_tables = False  # True: meta-training leaves the MF item tables as fitted
    # False: the item tables are not filled from an MF fitted on the training ratings; they start
    # N(0, cf_table_init^2) and are learned in the outer loop only (the private and federated
    # experiments, where no rating may be read outside the private or on-device computation)
    c.cf_mf_tables = True
    c.cf_table_init = 0.0
    c.cf_melu = False  # True: a MeLU network (the fields above) plus the CF term
    # True: neighbourhood CF too: each example's user-kNN and item-kNN predictions from its task's
    # support set (leave-one-out on support examples), blended by meta-learned weights
    c.cf_knn = False
    # True: the mf baseline's fold-in prediction as a third neighbour feature (leave-one-out on
    # support examples), blended like the kNN predictions; no effect without cf_knn (as
    # cf_knn_new_items)
    c.cf_knn_mf = False
    # True: new (out-of-vocabulary) items are blended too, though their neighbour predictions are
    # only the support mean; False: new items (and ids dropped by id_dropout) use the model alone
    c.cf_knn_new_items = False
    # True: new items (and ids dropped by id_dropout) are blended by weights of their own over
    # the features a new item has (the support mean, mu + b_u), whatever cf_knn_new_items says
    c.cf_knn_new_own = False
    # True: ... and their item-kNN feature is a content kNN instead of the support mean: the
    # user's support ratings weighted by genre similarity to the item (no effect without
    # cf_knn_new_own)
    c.cf_knn_new_content = False
    # > 0: a new item's prediction is shrunk toward the user's support mean by this weight
    c.cf_new_item_mean = 0.0
    # the user prior reads the first n demographic fields (age, gender, occupation, zip3); -1 = all
    c.cf_user_fields = -1
    # Transformer rater (model "transformer"); init_from: a pretraining run ("{seed}": per seed)
    c.init_from = ""
    c.tf_width = 64
    c.tf_depth = 2
    c.tf_heads = 2
    c.lora_rank = 0
    # named methods: a learner ("algo") with config fields overriding the base ones; list the
    # name in algos to run it, e.g. the CF-containing meta-learner on the hybrid model
    c.methods = {
        # the search's starting point: the previous tune stage's choice (BUILD_NOTES, "Quality")
        "cf_metasgd": {
            "algo": "metasgd",
            "model": "hybrid",
            "adapt": "user",
            "inner_lr": 0.46,
            "inner_steps": 1,
            "loss_prior": 80.0,
            "meta_lr": 0.0018,
            "cf_freeze_tables": True,
            "train_tasks": "resample_support",
            "cf_knn": True,
            "inner_newton": 5.25,
            "loss_sum_scale": 10.0,
            "cf_dim": 8,
            "cf_reg": 16.8,
            "id_dropout": 0.38,
            "cf_knn_new_items": False,
            "cf_melu": False,
            "cf_user_fields": -1,
            "outer_rank_weight": 0.0,
            # the best of a validation grid over 0, 0.25, 0.5, 0.75 (tune/configs/new_item_mean.py)
            "cf_new_item_mean": 0.5,
        },
    }
    c.recommended = ""  # the method the README names (its paired tests are reported)
    # meta-learning
    c.adapt = "decision"  # one of the model's adapt modes
    c.inner_steps = 5
    c.inner_lr = 0.05
    # > 0: the loss divides squared errors by (n + loss_prior) instead of n, so an inner step on
    # a small support set moves less (metarec.meta.inner.shrunk_mse); 0 = the plain mean
    c.loss_prior = 0.0
    # > 0: the loss is the sum of squared errors / loss_sum_scale (MF's per-user ridge problem;
    # with newton steps one step is its closed-form fold-in)
    c.loss_sum_scale = 0.0
    # > 0: damped Newton inner steps with this damping (few adapted parameters: the hybrid's user
    # vector); one step on the sum loss is MF's ridge fold-in with L2 = damping x loss_sum_scale / 2
    c.inner_newton = 0.0
    # > 0: the outer (query) loss adds this weight x ListNet's cross-entropy between the query
    # ratings and the predictions (metarec.meta.inner.with_rank_term): meta-training aims at the
    # ranking too while the inner loop still fits ratings (maml, fomaml and metasgd only)
    c.outer_rank_weight = 0.0
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
    # row-gather the model's lookup tables per task instead of differentiating them densely
    # (MeLU; same parameters up to float summation order, a step independent of the catalogue
    # size); a learner whose inner loop adapts a table falls back to the dense step
    c.sparse_tables = False
    # the meta-learners' budget; the tune stage scores its trials with the same, so the main job
    # trains the models the selection scored
    c.epochs = 20
    c.patience = 4
    # early stopping keeps the epoch with the lowest validation MAE - this x validation nDCG@k
    # (0 = MAE alone; the tune stage's objective and the step-scale calibration weigh nDCG by 1)
    c.early_stop_ndcg_weight = 0.0
    # after early stopping, a Meta-SGD method's learned inner rates are multiplied by the scale
    # of this grid that scores best on the validation users (MAE - nDCG@k); () = as learned.
    # The cold-start experiment and the tune stage (each point is scored after it)
    c.step_scales = (0.0, 0.25, 0.5, 0.75, 1.0)
    # >= 0: query examples of new (out-of-vocabulary) items are predicted with the learned inner
    # rates times this scale, a choice of the tune stage on its new-item stand-in, and the scale
    # above is chosen for known items; -1 = one scale for every item
    c.new_item_step_scale = -1.0
    c.eval_chunk = 64
    c.k = 3  # nDCG@k
    # the conventionally trained network fine-tuned per user (baseline "finetune")
    c.finetune_lrs = (0.01, 0.03, 0.1)
    c.finetune_epochs = 30
    c.finetune_patience = 8
    # bookkeeping
    c.ckpt_every = 50  # meta-steps between checkpoints inside an epoch (0: epoch ends only)
    c.keep_checkpoints = 2  # newest checkpoints kept per (seed, learner), plus the best
    c.log_every = 10  # meta-steps between metric records
    c.progress = True  # progress line with rate and ETA on stderr
    # seeds run at once, each in a process of its own (CPU only; 1: one after another in this
    # process). Results are the same either way; on 2 cores three took 1.2x less time than one
    c.seed_workers = 3
    c.report = True  # report/report.md with tables and figures at the end
    c.adaptation_curves = True  # re-evaluate the first learner with curve_steps / curve_support
    c.curve_steps = (0, 1, 2, 5, 10)
    c.curve_support = (1, 3, 5, 10, 20)
    return c
