"""Real BraTS 2018 in the release layout (four modalities) on a CPU budget: 2 mm, base 8, 240 steps.

    python -m cgc_jax.main --config=configs/brats_dev.py \
        --config.data.root=../shared/data/brats2018_dev --workdir=runs/brats_dev

Every stage on the 20 development cases in about 12 min on 2 idle CPU cores (prepare 7 s,
pseudo-labels 50 s, train 240 steps about 9.5 min, evaluate with flip TTA 1.5 min). Measured on
each scan's original 1 mm grid (2026-11-30): P (the pseudo-label recipe, mri_pseudo_labels in
common.py) Dice 0.785 +- 0.175; network 0.801 +- 0.144 (seed 0), 0.813 +- 0.137 (seed 1), mean
0.807. 240 steps became the default by the rule in docs/results.md (a switch wins when its 2-seed
mean beats the default's by more than the larger std of seed means): +2.1 points over 120 steps
(0.790, 0.783), std of seed means 0.006. The single FLAIR + T1 mixture this replaces gave P 0.654.
Why 2 mm and base 8: a whole brain fits one 80x96x72 crop, and a step takes ~2.4 s on 2 cores.
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
  c.train.steps = 240  # 120 gave 0.786 (2 seeds), 240 gives 0.807: docs/results.md, table refine
  c.train.batch_size = 2
  c.train.crop = (80, 96, 72)  # ~whole brain at 2 mm
  c.train.checkpoint_every = 40
  c.cgc.patch = (4, 4, 3)  # bottleneck is 10x12x9 cells
  c.eval.tta_flip = True
  return c
