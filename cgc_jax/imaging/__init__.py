"""Scans as NumPy arrays, no JAX: NIfTI reading and writing, the layouts of case folders, geometry
(reorient, crop, resample and back), morphology, metrics, phantoms and pictures.

May import: core, runtime.
"""
