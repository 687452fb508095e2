"""cgc_jax: unsupervised lesion segmentation of 3D MRI/CT with cross-granularity contrastive
learning."""
__version__ = '0.2.0'
