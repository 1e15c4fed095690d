"""Describe a dataset: cleaning counts and the cold-start scenarios of one protocol and seed."""
