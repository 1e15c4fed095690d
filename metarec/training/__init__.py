"""Training machinery shared by every experiment: the resumable trainer, orbax checkpoints and run
bookkeeping (progress, metrics, run metadata, work folders)."""
