"""The CGC module at the paper's geometry, on a CPU budget: 1 mm, 192x192x64 crops of four channels,
a 24x24x8 bottleneck and 6x6x2 mini-patches; only the width is reduced (base 4 instead of 32).

    python -m cgc_jax.studies.experiments --config=configs/brats_paper_geometry.py \
        --config.data.root=../shared/data/brats2018_dev --workdir=runs/paper_geometry \
        --table=cgc --track_every=0

Pseudo-labels as in brats_dev.py (the consensus recipe), computed on the 1 mm grid.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import brats_dev  # pylint: disable=g-import-not-at-top


def get_config():
  c = brats_dev.get_config()
  c.data.target_spacing = (1.0, 1.0, 1.0)
  c.train.crop = (192, 192, 64)  # the paper's crop: bottleneck 24x24x8 after three poolings
  c.cgc.patch = (6, 6, 2)  # the paper's mini-patch: 4x4x4 = 64 mini-patches per crop
  c.model.base = 4
  # 2.5 s a step on 2 cores with oneDNN's convolutions: 240 steps and an evaluation take ~11 min a
  # run (the brats_dev length; 60 steps, all that fitted with XLA's own at ~8 s a step, left the
  # network far below P)
  c.train.steps = 240
  c.train.checkpoint_every = 30
  c.eval.tta_flip = False  # 8x the inference time at 1 mm; both rows are scored alike
  return c
