"""Cross-fitting (train.folds): which cases each network leaves out, and that evaluation segments
each training case with the network that never saw its pseudo-labels."""
import os

import jax
import nibabel as nib
import numpy as np
import pytest

from cgc_jax import checkpoint
from cgc_jax import distributed
from cgc_jax import evaluate
from cgc_jax import folds
from cgc_jax import geometry
from cgc_jax import paths
from cgc_jax import pipeline
from cgc_jax import segmenter
from cgc_jax import sliding_window

from conftest import copy_inputs, tiny_config


def test_cases_go_to_folds_by_sorted_id():
  cases = ['c', 'a', 'e', 'b', 'd']  # sorted: a b c d e -> folds 0 1 0 1 0
  assert folds.assign(cases, 2) == {'a': 0, 'b': 1, 'c': 0, 'd': 1, 'e': 0}
  assert folds.assign(cases, 3) == {'a': 0, 'b': 1, 'c': 2, 'd': 0, 'e': 1}
  assert folds.training_cases(cases, 0, 2) == ['b', 'd']
  assert folds.training_cases(cases, 1, 2) == ['a', 'c', 'e']
  assert folds.training_cases(cases, 2, 3) == ['a', 'b', 'd', 'e']
  assert folds.training_cases(cases, 0, 1) == ['a', 'b', 'c', 'd', 'e']
  # every case is left out by exactly one network
  for n in (2, 3, 5):
    for c in cases:
      assert sum(c not in folds.training_cases(cases, f, n) for f in range(n)) == 1
  assert folds.run_dirs('/w', 1) == ['/w']
  assert folds.run_dirs('/w', 2) == ['/w/folds/0', '/w/folds/1']


def test_members_are_the_networks_that_did_not_see_the_case():
  seen = [{'b', 'd'}, {'a', 'c', 'e'}]
  assert folds.members_for('a', seen) == [0]
  assert folds.members_for('d', seen) == [1]
  assert folds.members_for('new', seen) == [0, 1]  # a new scan: every network
  assert folds.members_for('a', [{'a', 'b'}]) == [0]  # one network saw everything: it
  assert folds.members_for('a', [{'a'}, {'a'}, {'b'}]) == [2]


@pytest.mark.slow
def test_cross_fitting_networks_and_which_of_them_segment_a_case(tiny_workdir, tmp_path):
  """train.folds=2 on the 3 tiny phantoms: each network's checkpoints record exactly the cases
  outside its fold; the two networks differ on every case (so which segments it matters); each
  written mask is the one from the mean of both (eval.fold_networks='all'), or from the network
  that never saw the case ('unseen'); Segmenter restores both; a re-run is a no-op."""
  wd = str(tmp_path / 'wd')
  copy_inputs(tiny_workdir, wd)
  cfg = tiny_config(**{'train.folds': 2})
  pipeline.run(cfg, wd, 'all')
  assert not os.path.exists(paths.checkpoints(wd))
  prep = paths.prepared_store(cfg, wd)
  cases = prep.complete_cases()
  assert len(cases) == 3
  mesh = distributed.mesh()
  nch = prep.meta(cases[0])['arrays']['image']['shape'][-1]
  params = []
  for f, run_dir in enumerate(folds.run_dirs(wd, 2)):
    ckpt = checkpoint.Checkpointer(paths.checkpoints(run_dir), 3)
    assert ckpt.latest_step() == cfg.train.steps
    assert sorted(ckpt.record(ckpt.latest_step())['inputs']) == folds.training_cases(cases, f, 2)
    ckpt.close()
    params.append(evaluate.restore_params(cfg, run_dir, mesh, nch)[0])
  predictor = sliding_window.Predictor(cfg, mesh)
  fold_of = folds.assign(cases, 2)

  class Known:  # each network's probability for the case at hand, computed once below
    def predict_volume(self, p, image):
      del image
      return probs[next(i for i, q in enumerate(params) if q is p)]

  def written(c):
    return np.asarray(nib.load(os.path.join(wd, 'eval', 'predictions', f'{c}.nii.gz')).dataobj)

  masks = {}
  for c in cases:
    geom = geometry.Geometry.from_json(prep.meta(c)['geometry'])
    image = np.asarray(prep.read(c, 'image'), np.float32)
    brain = np.asarray(prep.read(c, 'brain'))
    probs = [predictor.predict_volume(p, image) for p in params]
    assert np.abs(probs[0] - probs[1]).max() > 1e-3
    prob, mask = evaluate.segment_prepared(cfg, Known(), params, image, brain, geom)
    np.testing.assert_allclose(prob, (probs[0] + probs[1]) / 2 * (brain > 0), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_array_equal(written(c), mask)
    masks[c] = evaluate.segment_prepared(cfg, Known(), params[fold_of[c]], image, brain, geom)[1]
  unseen = tiny_config(**{'train.folds': 2, 'eval.fold_networks': 'unseen'})
  pipeline.run(unseen, wd, 'evaluate')
  for c in cases:
    np.testing.assert_array_equal(written(c), masks[c])
  # a new scan (Segmenter, predict mode): both networks (segment_prepared averages a list)
  seg = segmenter.Segmenter.from_workdir(wd)
  assert isinstance(seg.params, list) and len(seg.params) == 2
  for got, want in zip(seg.params, params):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the same command again: both networks finished, the evaluation stands
  before = os.path.getmtime(os.path.join(wd, 'eval', 'summary.json'))
  pipeline.run(unseen, wd, 'all')
  assert os.path.getmtime(os.path.join(wd, 'eval', 'summary.json')) == before
