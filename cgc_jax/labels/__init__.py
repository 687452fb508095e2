"""The pseudo-labels' mixture: the per-case Gaussian mixture, its lesion rule and consensus.

May import: core, runtime, imaging.
"""
