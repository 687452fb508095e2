"""Where work runs: JAX multi-process start-up and barriers, the CPU process pool of the offline
stages, and the per-case bookkeeping that splits cases across them.

May import: core.
"""
