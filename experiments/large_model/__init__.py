"""The large-model comparison: MeLU vs a Transformer rater from scratch or pretrained, fine-tuned or
meta-learned, on the cold-start protocol."""
