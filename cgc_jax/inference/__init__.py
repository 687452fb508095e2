"""Applying trained networks: the sliding window, restoring networks from a workdir, the mask
rules that turn probabilities into a mask, and the label-free signals that track training.

May import: core, runtime, imaging, labels, model, training.
"""
