"""Real BraTS 2018 in the release layout (four modalities) on a CPU budget: 2 mm, base 8.

    python -m cgc_jax.main --config=configs/brats_dev.py \
        --config.data.root=../shared/data/brats2018_dev --workdir=runs/brats_dev
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top


def get_config():
  c = common.base_config()
  c.data.layout = 'brats'
  c.data.modalities = ('flair', 't1', 't1ce', 't2')
  c.data.target_spacing = (2.0, 2.0, 2.0)
  c.gmm.channels = ('flair', 't1')  # the single-mixture fallback (gmm.ensemble=())
  common.mri_pseudo_labels(c)
  c.model.base = 8
  c.train.steps = 120
  c.train.batch_size = 2
  c.train.crop = (80, 96, 72)  # ~whole brain at 2 mm
  c.train.checkpoint_every = 40
  c.cgc.patch = (4, 4, 3)  # bottleneck is 10x12x9 cells
  c.eval.tta_flip = True
  return c
