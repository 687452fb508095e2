"""Real BraTS 2018 in the release layout (four modalities) on a CPU budget: 2 mm, base 8, two
networks of 240 steps of generalised cross-entropy.

    python -m cgc_jax.main --config=configs/brats_dev.py \
        --config.data.root=../shared/data/brats2018_dev --workdir=runs/brats_dev

Every stage on the 20 development cases in about 12 min on 2 idle cores of an Intel Xeon with
oneDNN's convolutions (prepare 8 s, pseudo-labels 1.5 min, train two networks of 240 steps 4.3 min
each, evaluate both with flip TTA 1.7 min; peak memory 2.7 GB). Measured on each scan's original 1
mm grid: P (mri_pseudo_labels in common.py) Dice 0.785; network 0.8523 and 0.8513 on seeds 0 and 1
(+6.7 points; half A +9.0, half B +4.4; 2 cores of an AMD EPYC, docs/results.md). Each default
below was chosen in its day by seed means (docs/experiments/) and has since been re-judged by the
selection protocol of docs/results.md (both halves of the development cases, a paired interval,
the sample cases): only the one-mass rule (eval.keep_fraction) holds by all three conditions; the
others are ties or help on one half only. They stay on until a recipe without them has been
measured end to end (docs/results.md, "Every default re-judged"); the soft-Dice term was, and is
off.
Why 2 mm and base 8: a whole brain fits one 80x96x72 crop, and a step takes ~0.9 s on 2 cores;
base 4 and base 16 lose (0.837 and 0.833 over seeds 0 and 1,
docs/experiments/2026-12-01-refinement-and-paper-geometry.md).
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
  # 120: 0.786, 240: 0.807, 480: 0.801 (2 seeds, before the rules below;
  # docs/experiments/2026-12-01-refinement-and-paper-geometry.md); re-judged with every rule on:
  # 120 steps ties (+0.17 [-0.82, +1.46] on the development cases, +0.14 on the sample cases,
  # docs/results.md), so train.steps=120 halves the training time at no measured cost
  c.train.steps = 240
  # generalised cross-entropy: 0.815 against cross-entropy's 0.807 at 240 steps; with the edge
  # rule below 0.841 against 0.838 (seeds 0 and 1, docs/experiments/2026-12-01-edge-rule.md);
  # re-judged: a tie (docs/results.md)
  c.train.gce_q = 0.7
  # No soft-Dice term beside it (the paper's loss is cross-entropy alone): re-judged with every
  # other rule on, the term does not hold; the recipe without it gains on both halves (+0.14 and
  # +0.88 points), +0.51 [-0.07, +1.28] on all 20 and +1.37 on the sample cases (seeds 0 and 1,
  # 2026-12-08), most on scans whose P fails partly (docs/results.md, "Every default re-judged")
  c.train.dice_weight = 0.0
  c.train.batch_size = 2
  c.train.crop = (80, 96, 72)  # ~whole brain at 2 mm
  c.train.checkpoint_every = 40
  c.cgc.patch = (4, 4, 3)  # bottleneck is 10x12x9 cells
  c.eval.tta_flip = True
  # Components of the network's mask below half the largest are dropped (a glioma's whole tumour
  # is one mass: in all 20 development cases its largest component holds >= 95% of it):
  # 0.815 -> 0.838 (seeds 0.8400, 0.8360; docs/experiments/2026-11-30-one-mass.md); keep-all and
  # 0.1 lose on every run; re-judged: holds on both halves (docs/results.md).
  c.eval.keep_fraction = 0.5
  # The tumour's edge from the case's own mixture: voxels within 4 mm (two voxels) of the border of
  # the network's mask take P's side (docs/method.md): 0.8323 -> 0.8400 over seeds 0-3 on an Intel
  # Xeon (docs/experiments/2026-12-01-edge-rule.md); 2 and 3 mm gain less; re-judged: gains on
  # half A only (docs/results.md).
  c.eval.border_mm = 4.0
  # P's left-right symmetric voxels (in P and in its mirror image, FLAIR less than 0.3 z-units
  # brighter than the mirror's: the grey matter P takes for lesion in low-contrast scans) teach
  # nothing (weight 0 in the loss) and have no say in the edge rule
  # (docs/experiments/2026-12-02-symmetry-loss.md; re-judged: gains on half A only). Gliomas sit
  # in one hemisphere; for lesions on both sides see configs/multifocal.py.
  c.train.symmetry_margin = 0.3
  c.eval.border_symmetry = True
  # Two networks (seeds s and s + 1000, each on every case), their mean segmenting: with the two
  # rules above, 0.8467 against 0.8427 for one network with the loss rule alone over seeds 0-3
  # (docs/experiments/2026-12-02-default.md); it halves the spread between seeds; re-judged: gains
  # on both halves, ties on the sample cases. Twice the training and inference time.
  c.train.ensemble = 2
  return c
