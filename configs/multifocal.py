"""Many small lesions in both hemispheres: every single-mass rule off, on phantoms with four small
lesions each (two per hemisphere).

    python -m cgc_jax.main --config=configs/multifocal.py --workdir=runs/multifocal

The demo's phantoms and training budget (demo.py), with data.phantoms.lesions = 4 (semi-axes of
5-9 mm, alternating between the hemispheres). Off, because each assumes one mass on one side:
P's major-component rule (gmm.keep_fraction) and its opening (a 3 mm grid's opening erases a lesion
under three voxels across), the network's one-mass rule (eval.keep_fraction), and P's symmetric
voxels left out of the loss and the edge rule (train.symmetry_margin, eval.border_symmetry).
Figures against brats_dev.py's single-mass rules on the same phantoms: docs/results.md.
For real scans with several lesions, set the same fields on the config of your data.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # pylint: disable=g-import-not-at-top


def get_config():
  c = demo.get_config()
  c.data.phantoms.lesions = 4
  c.gmm.keep_fraction = 0.0
  c.gmm.open_iterations = 0
  c.eval.keep_fraction = 0.0
  c.train.symmetry_margin = 0.0
  c.eval.border_symmetry = False
  return c
