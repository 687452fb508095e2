"""Bookkeeping with no JAX: the workdir layout and its stores, per-stage config fingerprints,
config rules, a run's networks (folds and ensemble seeds).

Imports nothing of cgc_jax but `errors`. The lowest layer: every other may import it.
"""
