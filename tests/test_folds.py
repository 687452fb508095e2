"""A run's networks: cross-fitting (train.folds: which cases each network leaves out, and that
evaluation segments each training case with the network that never saw its pseudo-labels) and an
ensemble (train.ensemble: network 0 is the one-network run, the others its seeds + 1000 m, their
mean segmenting)."""
import os
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

from cgc_jax import pipeline
from cgc_jax import segmenter
from cgc_jax.core import fingerprints
from cgc_jax.core import folds
from cgc_jax.core import paths
from cgc_jax.imaging import geometry
from cgc_jax.inference import masks
from cgc_jax.inference import restore
from cgc_jax.inference import sliding_window
from cgc_jax.model import checkpoint
from cgc_jax.runtime import distributed

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


def test_ensemble_networks_are_one_network_runs_of_their_own_seeds():
  assert folds.run_dirs('/w', 1, 1) == ['/w']
  assert folds.run_dirs('/w', 1, 3) == ['/w', '/w/ensemble/1', '/w/ensemble/2']
  c = tiny_config(**{'train.ensemble': 3, 'train.seed': 7})
  assert folds.network_dirs(c, '/w') == ['/w', '/w/ensemble/1', '/w/ensemble/2']
  one = tiny_config(**{'train.seed': 7})
  assert folds.network_dirs(one, '/w') == ['/w']
  assert (folds.num_networks(c), folds.num_networks(one)) == (3, 1)
  assert folds.num_networks(tiny_config(**{'train.folds': 2})) == 2
  assert folds.network_config(one, 0) is one
  for m, seed in enumerate((7, 1007, 2007)):
    net = folds.network_config(c, m)
    assert (net.train.seed, net.train.ensemble) == (seed, 1)
    # network m's training fingerprint is the one-network run's of that seed: network 0's
    # checkpoints are exactly the one-network run's, and each network resumes as that run would
    assert fingerprints.of(net, 'train') == fingerprints.of(tiny_config(**{'train.seed': seed}),
                                                            'train')
  assert c.train.seed == 7 and c.train.ensemble == 3  # the run's own config is untouched


def test_members_are_the_networks_that_did_not_see_the_case():
  seen = [{'b', 'd'}, {'a', 'c', 'e'}]
  assert folds.members_for('a', seen) == [0]
  assert folds.members_for('d', seen) == [1]
  assert folds.members_for('new', seen) == [0, 1]  # a new scan: every network
  assert folds.members_for('a', [{'a', 'b'}]) == [0]  # one network saw everything: it
  assert folds.members_for('a', [{'a'}, {'a'}, {'b'}]) == [2]


def test_agreement_weights_hand_the_case_to_the_unseen_networks_as_p_fails():
  p = np.zeros((4, 4, 2), bool)
  p[:2] = True  # 16 voxels
  brain = np.ones_like(p)
  unseen = np.where(p, 0.9, 0.1).astype(np.float32)
  unseen[:2, :2] = 0.2  # the unseen network finds 8 of P's 16 voxels: Dice 2*8/(8+16) = 2/3
  seen = np.full(p.shape, 0.7, np.float32)
  weigh = masks.agreement_weights(p, 1, brain)
  np.testing.assert_allclose(weigh([unseen, seen]), [1 / 3, 2 / 3])
  # two unseen networks (their mean decides a), one seen; an unseen mask equal to P: a = 1
  weigh = masks.agreement_weights(p, 2, brain)
  np.testing.assert_allclose(weigh([np.where(p, 0.8, 0.0), np.where(p, 0.6, 0.2), seen]),
                             [0.0, 0.0, 1.0])
  # an unseen mask that misses P entirely: the seen network has no weight
  miss = np.where(p, 0.1, 0.9).astype(np.float32)
  np.testing.assert_allclose(masks.agreement_weights(p, 1, brain)([miss, seen]), [1.0, 0.0])
  # outside the brain nothing counts
  brain2 = brain.copy()
  brain2[:2, :2] = False
  np.testing.assert_allclose(masks.agreement_weights(p, 1, brain2)([unseen, seen]), [0.0, 1.0])


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
    params.append(restore.restore_params(cfg, run_dir, mesh, nch)[0])
  predictor = sliding_window.Predictor(cfg, mesh)
  fold_of = folds.assign(cases, 2)

  class Known:  # each network's probability for the case at hand, computed once below
    def predict_volume(self, p, image):
      del image
      return probs[next(i for i, q in enumerate(params) if q is p)]

  def written(c):
    return np.asarray(nib.load(os.path.join(wd, 'eval', 'predictions', f'{c}.nii.gz')).dataobj)

  want = {}
  for c in cases:
    geom = geometry.Geometry.from_json(prep.meta(c)['geometry'])
    image = np.asarray(prep.read(c, 'image'), np.float32)
    brain = np.asarray(prep.read(c, 'brain'))
    probs = [predictor.predict_volume(p, image) for p in params]
    assert np.abs(probs[0] - probs[1]).max() > 1e-3
    prob, mask = masks.segment_prepared(cfg, Known(), params, image, brain, geom)
    np.testing.assert_allclose(prob, (probs[0] + probs[1]) / 2 * (brain > 0), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_array_equal(written(c), mask)
    want[c] = masks.segment_prepared(cfg, Known(), params[fold_of[c]], image, brain, geom)[1]
  unseen = tiny_config(**{'train.folds': 2, 'eval.fold_networks': 'unseen'})
  pipeline.run(unseen, wd, 'evaluate')
  for c in cases:
    np.testing.assert_array_equal(written(c), want[c])
  # 'agreement': both networks, the one that saw the case weighing a = Dice(unseen mask, P)
  labels = paths.pl_store(cfg, wd)
  agree = tiny_config(**{'train.folds': 2, 'eval.fold_networks': 'agreement'})
  pipeline.run(agree, wd, 'evaluate')
  for c in cases:
    geom = geometry.Geometry.from_json(prep.meta(c)['geometry'])
    image = np.asarray(prep.read(c, 'image'), np.float32)
    brain = np.asarray(prep.read(c, 'brain')) > 0
    own_p = np.asarray(labels.read(c, 'p')) > 0
    u, s = fold_of[c], 1 - fold_of[c]
    probs = [predictor.predict_volume(q, image) for q in params]  # what Known() returns
    pu, ps = probs[u], probs[s]
    mask_u = (pu > 0.5) & brain
    a = 2 * np.sum(mask_u & own_p) / (np.sum(mask_u) + np.sum(own_p & brain))
    assert 0.0 < a < 1.0
    prob = masks.segment_prepared(agree, Known(), [params[u], params[s]], image, brain, geom,
                                  weigh=lambda probs: [1 - a, a])[0]
    np.testing.assert_allclose(prob, ((1 - a) * pu + a * ps) * brain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(written(c), geometry.prob_to_original_mask(prob, geom))
  # a new scan (Segmenter, predict mode): both networks (segment_prepared averages a list)
  seg = segmenter.Segmenter.from_workdir(wd)
  assert isinstance(seg.params, list) and len(seg.params) == 2
  for got, want in zip(seg.params, params):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the same command again: both networks finished, the evaluation stands
  before = os.path.getmtime(os.path.join(wd, 'eval', 'summary.json'))
  pipeline.run(agree, wd, 'all')
  assert os.path.getmtime(os.path.join(wd, 'eval', 'summary.json')) == before


@pytest.mark.slow
def test_an_ensemble_grows_from_a_finished_run_and_segments_with_the_mean(tiny_trained, tmp_path):
  """train.ensemble=2 on a finished one-network run: network 0's checkpoint is left as it was (not
  retrained), network 1 trains with seed + 1000 in WORKDIR/ensemble/1, and every written mask is
  the one from the mean of both networks' probabilities; Segmenter restores both."""
  wd = str(tmp_path / 'wd')
  shutil.copytree(tiny_trained, wd)
  one = tiny_config(**{'eval.pictures': False})
  mesh = distributed.mesh()
  prep = paths.prepared_store(one, wd)
  cases = prep.complete_cases()
  nch = prep.meta(cases[0])['arrays']['image']['shape'][-1]
  first = restore.restore_params(one, wd, mesh, nch)[0]
  ckpt_files = sorted(os.listdir(paths.checkpoints(wd)))
  cfg = tiny_config(**{'eval.pictures': False, 'train.ensemble': 2})
  pipeline.run(cfg, wd, 'all')
  assert sorted(os.listdir(paths.checkpoints(wd))) == ckpt_files
  ckpt = checkpoint.Checkpointer(paths.checkpoints(os.path.join(wd, 'ensemble', '1')), 3)
  assert ckpt.latest_step() == cfg.train.steps
  record = ckpt.record(ckpt.latest_step())
  ckpt.close()
  assert record['config']['train']['seed'] == one.train.seed + 1000
  assert sorted(record['inputs']) == sorted(cases)
  nets, step = restore.restore_networks(cfg, wd, mesh, nch)
  assert step == cfg.train.steps and len(nets) == 2
  for a, b in zip(jax.tree.leaves(nets[0][0]), jax.tree.leaves(first)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  predictor = sliding_window.Predictor(cfg, mesh)
  for c in cases:
    geom = geometry.Geometry.from_json(prep.meta(c)['geometry'])
    image = np.asarray(prep.read(c, 'image'), np.float32)
    brain = np.asarray(prep.read(c, 'brain'))
    probs = [predictor.predict_volume(p, image) for p, _ in nets]
    assert np.abs(probs[0] - probs[1]).max() > 1e-3  # two seeds, two different networks
    prob, mask = masks.segment_prepared(cfg, predictor, [p for p, _ in nets], image, brain, geom)
    np.testing.assert_allclose(prob, (probs[0] + probs[1]) / 2 * (brain > 0), rtol=1e-6,
                               atol=1e-7)
    written = nib.load(os.path.join(wd, 'eval', 'predictions', f'{c}.nii.gz')).dataobj
    np.testing.assert_array_equal(np.asarray(written), mask)
  seg = segmenter.Segmenter.from_workdir(wd)
  assert isinstance(seg.params, list) and len(seg.params) == 2
