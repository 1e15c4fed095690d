"""Multi-process meta-training on JAX's distributed runtime: every process feeds its rows of each
meta-batch to the one jitted meta-step (``run``: the problem and the loops, a hand-written one and
the library's ``meta_train``; ``main``: the launcher, one process per host or per accelerator).
``tests/integration/test_distributed.py`` runs it with two processes on localhost against one
process over the whole meta-batch."""
