"""Real BraTS 2018 in the release layout (four modalities) on a CPU budget: 2 mm, base 8, two
networks of 240 steps of generalised cross-entropy.

    python -m cgc_jax.main --config=configs/brats_dev.py \
        --config.data.root=../shared/data/brats2018_dev --workdir=runs/brats_dev

Every stage on the 20 development cases in about 12 min on 2 idle cores of an Intel Xeon with
oneDNN's convolutions (prepare 8 s, pseudo-labels 1.5 min, train two networks of 240 steps 4.3 min
each, evaluate both with flip TTA 1.7 min; peak memory 2.7 GB). Measured on each scan's original 1
mm grid: P (the pseudo-label recipe, mri_pseudo_labels in common.py) Dice 0.785 +- 0.175; network
0.8486 and 0.8473 on seeds 0 and 1 (2026-12-02), 0.847 over seeds 0-3 (0.8486, 0.8473, 0.8460,
0.8448), +6.3 points over P on seeds 0 and 1. Chosen by the rule in docs/results.md (a switch wins
when its seed mean beats the default's by more than the larger std of seed means): 240 steps beat
120 (0.807 against 0.786), generalised cross-entropy (q = 0.7) beat cross-entropy at 240 steps
(0.815 against 0.807, std 0.006); 480 steps did not (0.801); dropping the network's components below
half its largest beat keeping them (0.838 against 0.815, AMD EPYC); the edge from each case's
mixture beat the network's own (0.840 against 0.832, four seeds, Intel Xeon); P's symmetric voxels
out of the loss beat counting them (0.8427 against 0.8381, six seeds); out of the edge rule too,
with two networks, beat one network with the loss rule alone (0.8467 against 0.8427, four seeds).
The single FLAIR + T1 mixture this replaces gave P 0.654.
Why 2 mm and base 8: a whole brain fits one 80x96x72 crop, and a step takes ~0.9 s on 2 cores;
base 4 and base 16 lose (0.837 and 0.833 over seeds 0 and 1, docs/results.md).
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
  c.train.steps = 240  # 120: 0.786, 240: 0.807, 480: 0.801 (2 seeds; docs/results.md, table refine)
  # generalised cross-entropy: 0.815 against cross-entropy's 0.807 at 240 steps; with the edge
  # rule below 0.841 against 0.838 (seeds 0 and 1, docs/results.md)
  c.train.gce_q = 0.7
  c.train.batch_size = 2
  c.train.crop = (80, 96, 72)  # ~whole brain at 2 mm
  c.train.checkpoint_every = 40
  c.cgc.patch = (4, 4, 3)  # bottleneck is 10x12x9 cells
  c.eval.tta_flip = True
  # Components of the network's mask below half the largest are dropped (a glioma's whole tumour
  # is one mass: in all 20 development cases its largest component holds >= 95% of it):
  # 0.815 -> 0.838 (seeds 0.8400, 0.8360; docs/results.md); keep-all and 0.1 lose on every run.
  c.eval.keep_fraction = 0.5
  # The tumour's edge from the case's own mixture: voxels within 4 mm (two voxels) of the border of
  # the network's mask take P's side (docs/method.md): 0.8323 -> 0.8400 over seeds 0-3 on an Intel
  # Xeon (docs/results.md, "The tumour's edge"); 2 and 3 mm gain less.
  c.eval.border_mm = 4.0
  # P's left-right symmetric voxels (in P and in its mirror image, FLAIR less than 0.3 z-units
  # brighter than the mirror's: the grey matter P takes for lesion in low-contrast scans) teach
  # nothing (weight 0 in the loss) and have no say in the edge rule (docs/results.md, "P's
  # symmetric voxels"). Gliomas sit in one hemisphere; for lesions on both sides set
  # train.symmetry_margin = 0 and eval.border_symmetry = False.
  c.train.symmetry_margin = 0.3
  c.eval.border_symmetry = True
  # Two networks (seeds s and s + 1000, each on every case), their mean segmenting: with the two
  # rules above, 0.8467 against 0.8427 for one network with the loss rule alone over seeds 0-3
  # (docs/results.md); it halves the spread between seeds. Twice the training and inference time.
  c.train.ensemble = 2
  return c
