"""Masked-item pretraining of the history Transformer on the training users of one split."""
