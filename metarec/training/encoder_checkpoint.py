"""Pretrained history-encoder checkpoints: the folder a pretraining run leaves behind.

Layout: ``params/`` (orbax ``StandardCheckpointer``), ``encoder_config.json`` (the
:class:`~metarec.models.transformer.EncoderConfig` plus free-form ``metadata``) and optionally
``item_ids.npy`` (the raw item id of every vocabulary index, so a loader can check that its item
indexing is the one the encoder was trained with). Models never read these files: a caller loads
the parameters with :func:`load_pretrained` and hands them to the model factory
(``make_transformer_rater(config, pretrained=params)``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metarec.models.transformer import EncoderConfig, init_encoder

CONFIG_FILE = "encoder_config.json"
PARAMS_DIR = "params"
ITEMS_FILE = "item_ids.npy"
FILES = (PARAMS_DIR, CONFIG_FILE, ITEMS_FILE)


def save_pretrained(
    path: str,
    params,
    config: EncoderConfig,
    item_ids: np.ndarray | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write an encoder checkpoint folder (layout in the module docstring); ``params`` as
    :func:`~metarec.models.transformer.init_encoder` makes them. Returns the absolute path."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, PARAMS_DIR)):
        if not overwrite:
            raise FileExistsError(
                f"checkpoint {path} already exists (pass overwrite=True to replace it)"
            )
        shutil.rmtree(os.path.join(path, PARAMS_DIR))
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, PARAMS_DIR), jax.device_get(params))
    ckpt.wait_until_finished()
    blob = {"encoder": config.to_dict(), "metadata": dict(metadata or {})}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(blob, f, indent=1, default=str)
    if item_ids is not None:
        np.save(os.path.join(path, ITEMS_FILE), np.asarray(item_ids, np.int64))
    return path


def load_pretrained(path: str, with_metadata: bool = False):
    """Load a checkpoint written by :func:`save_pretrained`.

    Returns ``(config, params)`` (``params`` is ``{"params": ...}``), or ``(config, params, info)``
    with ``with_metadata``, where ``info`` has ``metadata`` and ``item_ids`` (or None).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(
            f"{cfg_file} not found: {path} is not a checkpoint written by save_pretrained"
        )
    try:
        with open(cfg_file) as f:
            blob = json.load(f)
        config = EncoderConfig.from_dict(blob["encoder"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: invalid encoder config ({e})") from e
    target = jax.eval_shape(lambda: init_encoder(jax.random.PRNGKey(0), config))
    params = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR), target)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if not with_metadata:
        return config, params
    items_file = os.path.join(path, ITEMS_FILE)
    info = {
        "metadata": blob.get("metadata", {}),
        "item_ids": np.load(items_file) if os.path.exists(items_file) else None,
    }
    return config, params, info


def item_ids_of_vocab(encoder) -> np.ndarray:
    """Raw item id of every index of a fitted ``FeatureEncoder``'s item vocabulary (``-1`` for the
    OOV index 0 and unused capacity)."""
    vocab = encoder.vocabs["item_id"]
    ids = np.full(encoder.spec.item_vocab[1], -1, np.int64)
    for tok, i in vocab.index.items():
        ids[i] = int(tok)
    return ids


def same_item_vocab(item_ids: np.ndarray | None, encoder) -> bool:
    """Whether a checkpoint's ``item_ids`` index items as ``encoder`` does (True when the
    checkpoint recorded no item ids)."""
    return item_ids is None or np.array_equal(np.asarray(item_ids), item_ids_of_vocab(encoder))


__all__ = [
    "CONFIG_FILE",
    "FILES",
    "ITEMS_FILE",
    "PARAMS_DIR",
    "item_ids_of_vocab",
    "load_pretrained",
    "same_item_vocab",
    "save_pretrained",
]
