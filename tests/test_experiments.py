"""The experiment driver: z as bottleneck fractions, pooled and across-seed statistics, shared stages."""
import json
import os

import numpy as np

from cgc_jax import experiments

from conftest import copy_inputs
from conftest import tiny_config


def test_patch_sizes_are_fractions_of_the_bottleneck():
  c = tiny_config(**{'train.crop': (192, 192, 64), 'model.levels': 4})
  got = [experiments._apply(c, {'cgc.patch': experiments._z(f)}).cgc.patch for f in (2, 4, 8)]
  assert got == [(12, 12, 4), (6, 6, 2), (3, 3, 1)]  # the paper's three z on its 24x24x8 bottleneck
  c = tiny_config(**{'train.crop': (48, 64, 48), 'model.levels': 4})
  assert experiments._apply(c, {'cgc.patch': experiments._z(8)}).cgc.patch == (1, 1, 1)


def test_row_summary_pools_cases_and_reports_the_spread_of_seed_means():
  def row(d):
    return {'dice': d, 'sensitivity': 1.0, 'assd': 2.0, 'pred_voxels': 1, 'ref_voxels': 1}
  s = experiments._row_summary({0: [row(0.5), row(0.7)], 1: [row(0.8), row(0.9)]}, 12.0)
  assert abs(s['dice']['mean'] - 0.725) < 1e-12
  assert abs(s['dice']['std'] - np.std([0.5, 0.7, 0.8, 0.9])) < 1e-12
  np.testing.assert_allclose(s['dice_seed_means'], [0.6, 0.85], rtol=1e-12)
  assert abs(s['dice_std_across_seeds'] - 0.125) < 1e-12
  md = experiments.markdown('t', {'r': s}, tiny_config())
  assert '| r | 0.7250 +- 0.1479 | 0.1250 | 1.0000 +- 0.0000 | 2.00 +- 0.00 | 12 |' in md


def test_a_table_shares_the_offline_stages(tiny_workdir, tmp_path, monkeypatch):
  base = str(tmp_path / 'base')
  copy_inputs(tiny_workdir, base)
  monkeypatch.setitem(experiments.TABLES, 'mini', [
      ('GMM (P)', 'gmm', None), ('threshold (P)', 'threshold', None),
      ('backbone + P', 'gmm', {'cgc.coarse': False, 'cgc.fine': False})])
  res = experiments.run_table(tiny_config(**{'train.steps': 2}), base, 'mini', [0])
  with open(os.path.join(tiny_workdir, 'pseudo_labels', 'summary.json')) as f:
    gmm_p = json.load(f)['summary']['dice']['mean']
  assert abs(res['GMM (P)']['dice']['mean'] - gmm_p) < 1e-12  # the base's own P, not redone
  assert os.path.exists(os.path.join(base, 'experiments', 'p_threshold', 'pseudo_labels'))
  run = os.path.join(base, 'experiments', 'mini', 'backbone_p', 'seed0')
  assert os.path.islink(os.path.join(run, 'prepared'))
  with open(os.path.join(run, 'eval', 'summary.json')) as f:
    assert abs(json.load(f)['summary']['CGC network']['dice']['mean'] -
               res['backbone + P']['dice']['mean']) < 1e-12
