"""Multi-process meta-training on JAX's distributed runtime: every process feeds its rows of each
meta-batch to the one jitted meta-step (``run``: the problem and the loop; ``main``: the launcher,
one process per host or per accelerator). ``tests/test_distributed.py`` runs it with two processes
on localhost against one process over the whole meta-batch."""
