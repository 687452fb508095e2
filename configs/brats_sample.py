"""The 5 real BraTS 2018 cases of ../shared/data/brats2018_sample (FLAIR + T1, folder layout) at 2
mm.

    python -m cgc_jax.main --config=configs/brats_sample.py \
        --config.data.root=../shared/data/brats2018_sample --workdir=runs/brats_sample

Every stage with one network (--config.train.ensemble=1) in 4.3 min on 2 idle cores of an Intel Xeon
with oneDNN's convolutions (seed 0: network 0.8402), about 10 min with XLA's own. Measured on the
original 1 mm grid (2026-11-30, seed 0): P (the real-MRI recipe of common.py with its two FLAIR + T1
members) Dice 0.834 +- 0.144, CGC network 0.842 +- 0.127 (brats_dev.py's 240 steps of generalised
cross-entropy, flip TTA; 0.842 with cross-entropy, 0.834 at 120 steps); the single K=4 mixture this
replaces gave P 0.763. With brats_dev.py's edge rule (eval.border_mm = 4; 2026-12-01, Intel Xeon):
0.8409 and 0.8415 on seeds 0 and 1, against 0.8437 and 0.8443 without it (-0.3: here the network is
not short of the tumour's edge, and P misses half of case_2). With brats_dev.py's symmetry rules and
two networks (2026-12-02, Intel Xeon; every stage 9-10 min from an empty workdir, each network's
training 4.3 min): 0.8438 and 0.8431 on seeds 0 and 1. Without the soft-Dice term (brats_dev.py
since 2026-12-08; AMD EPYC): 0.8536 and 0.8605 (P 0.8337).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import brats_dev  # pylint: disable=g-import-not-at-top


def get_config():
  """brats_dev.py's recipe on the folder layout with FLAIR + T1 only (the consensus keeps its two
  FLAIR + T1 members)."""
  c = brats_dev.get_config()
  c.data.layout = 'folder'
  c.data.modalities = ('flair', 't1')
  c.data.filenames.flair = 'FLAIR.nii.gz'
  c.data.filenames.t1 = 'T1.nii.gz'
  c.data.label = 'GT_W.nii.gz'
  c.data.label_values = (0, 1)
  return c
