"""The pipeline's stages, one module each: prepare, pseudo_labels, train, evaluate, predict.

May import every layer below; no stage imports another (cgc_jax.pipeline runs them in order).
"""
