"""Evaluate-stage helpers: the label-free signals tracked along training, against hand values."""
import json
import os

import numpy as np
import pytest

from cgc_jax.core import paths
from cgc_jax.imaging import geometry
from cgc_jax.imaging import metrics
from cgc_jax.imaging import morphology
from cgc_jax.inference import masks
from cgc_jax.inference import restore
from cgc_jax.inference import sliding_window
from cgc_jax.inference import tracking
from cgc_jax.labels import references
from cgc_jax.runtime import distributed
from cgc_jax.stages import evaluate
from cgc_jax.stages import prepare

from conftest import copy_inputs
from conftest import tiny_config


def _dice(a, b):
  s = a.sum() + b.sum()
  return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


def test_tracked_signals_match_hand_values(tiny_workdir, tmp_path, monkeypatch):
  """A fake network whose lesion probability is q on the left half of the volume and 1 - q on the
  right: every signal then has a closed form in the stored brain mask, P and label."""
  cfg = tiny_config(**{'eval.every_steps': 1, 'eval.confident': 0.2})
  wd = str(tmp_path / 'wd')
  copy_inputs(tiny_workdir, wd)
  q = 0.8

  def fake(self, params, image):
    del self, params
    out = np.full(image.shape[:3], 1 - q, np.float32)
    out[:image.shape[0] // 2] = q
    return out
  monkeypatch.setattr(sliding_window.Predictor, 'predict_volume', fake)
  track = tracking.track_during_training(cfg, wd, distributed.mesh())
  track({'unet': None}, 7)
  with open(os.path.join(wd, 'train', 'track.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1 and rows[0]['step'] == 7
  prep = paths.prepared_store(cfg, wd)
  labels = paths.pl_store(cfg, wd)
  refs = paths.reference_store(cfg, wd)
  cases = prep.complete_cases()
  assert sorted(rows[0]['cases']) == sorted(cases)
  for c in cases:
    brain = np.asarray(prep.read(c, 'brain')) > 0
    post = np.asarray(labels.read(c, 'posterior'), np.float32)
    x = brain.shape[0]
    left = np.zeros_like(brain)
    left[:x // 2] = True
    mask = left & brain  # q > 0.5 on the left only
    mirrored = left[::-1] & brain
    prob = np.where(left, q, 1 - q)
    pos, neg = brain & (post >= 0.8), brain & (post <= 0.2)
    terms = [-np.log(1 - prob[neg]).mean()] + ([-np.log(prob[pos]).mean()] if pos.any() else [])
    got = rows[0]['cases'][c]
    np.testing.assert_allclose(got['flip_agreement'], _dice(mask, mirrored), atol=1e-9)
    np.testing.assert_allclose(got['p_agreement'], _dice(mask, post > 0.5), atol=1e-9)
    np.testing.assert_allclose(got['confident_ce'], np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(got['dice'], _dice(mask, np.asarray(refs.read(c, 'label')) > 0),
                               atol=1e-9)
  for k in ('flip_agreement', 'p_agreement', 'confident_ce', 'dice'):
    np.testing.assert_allclose(rows[0][k], np.mean([r[k] for r in rows[0]['cases'].values()]),
                               rtol=1e-9)


def test_tracking_signals_on_a_hand_made_case():
  """Six voxels, five in the brain: every signal worked out by hand."""
  brain = np.array([1, 1, 1, 1, 1, 0], bool)
  prob = np.array([0.9, 0.8, 0.3, 0.1, 0.6, 0.0], np.float32)
  mirrored = np.array([0.9, 0.2, 0.7, 0.1, 0.6, 0.0], np.float32)
  post = np.array([1.0, 0.6, 0.9, 0.0, 0.1, 1.0], np.float32)
  label = np.array([1, 1, 0, 0, 0, 0], bool)
  r = tracking.tracking_signals(prob, mirrored, post, brain, 0.2, label)
  # masks: net {0,1,4}, flip {0,2,4}, P {0,1,2,5}
  np.testing.assert_allclose(r['flip_agreement'], 2 * 2 / 6)
  np.testing.assert_allclose(r['p_agreement'], 2 * 2 / 7)
  # confident lesion voxels (post >= 0.8, in the brain): 0, 2; confident normal (<= 0.2): 3, 4
  want = np.mean([-np.mean(np.log([1 - 0.1, 1 - 0.6])), -np.mean(np.log([0.9, 0.3]))])
  np.testing.assert_allclose(r['confident_ce'], want, rtol=1e-6)
  np.testing.assert_allclose(r['dice'], 2 * 2 / 5)
  assert 'dice' not in tracking.tracking_signals(prob, mirrored, post, brain, 0.2)
  empty = tracking.tracking_signals(np.zeros(6, np.float32), np.zeros(6, np.float32), post,
                                    brain, 0.2)
  assert np.isnan(empty['flip_agreement']) and empty['p_agreement'] == 0.0
  means = tracking.tracking_means({'a': r, 'b': empty})
  np.testing.assert_allclose(means['flip_agreement'], r['flip_agreement'])  # NaN left out
  np.testing.assert_allclose(means['p_agreement'], r['p_agreement'] / 2)
  np.testing.assert_allclose(means['dice'], r['dice'])  # only the case that has a label


def test_score_case_against_a_hand_count(tiny_workdir):
  """The network's Dice from voxel counts on the original grid; P's metrics are the pseudo-label
  stage's stored ones, and its mask is the stored posterior above the threshold."""
  cfg = tiny_config()
  prep, labels = paths.prepared_store(cfg, tiny_workdir), paths.pl_store(cfg, tiny_workdir)
  refs = paths.reference_store(cfg, tiny_workdir)
  case = next(c for c in prep.complete_cases() if refs.is_complete(c))
  geom = geometry.Geometry.from_json(prep.meta(case)['geometry'])
  ref = geometry.to_original(np.asarray(refs.read(case, 'label_native')), geom.native()) > 0
  net = np.zeros_like(ref)
  net[:net.shape[0] // 2] = True  # half the volume
  row, mn, mp, p_mask = evaluate.score_case(cfg, prep, labels, refs, case, net)
  want = 2 * (net & ref).sum() / (net.sum() + ref.sum())
  np.testing.assert_allclose(mn['dice'], want, rtol=1e-12)
  assert row['case'] == case and row['net_dice'] == mn['dice']
  post = np.asarray(labels.read(case, 'posterior'), np.float32)
  p_orig = geometry.prob_to_original_mask(post, geom, cfg.gmm.threshold) > 0
  np.testing.assert_allclose(mp['dice'], 2 * (p_orig & ref).sum() / (p_orig.sum() + ref.sum()),
                             rtol=1e-12)
  # the same as the pseudo-label stage's cached score of this P against this reference
  assert mp == references.p_scores(cfg, prep, labels, refs, [case])[case]
  assert row['p_dice'] == mp['dice']
  np.testing.assert_array_equal(p_mask, post > cfg.gmm.threshold)
  assert evaluate.score_case(cfg, prep, labels, refs, case, ref)[1]['dice'] == 1.0


def test_an_evaluation_is_current_only_while_everything_it_used_is():
  done = {'fingerprint': 'f', 'checkpoint_step': 40, 'inputs': {'a': ['1', '2']},
          'cases': [{'case': 'a'}, {'case': 'b'}]}
  args = ('f', 40, {'a': ['1', '2']}, ['b', 'a'], True)
  assert evaluate.is_current(done, *args)
  assert not evaluate.is_current(None, *args)
  for i, other in enumerate(('g', 80, {'a': ['1', '3']}, ['a'], False)):
    changed = list(args)
    changed[i] = other
    assert not evaluate.is_current(done, *changed), i


def test_select_keeps_the_best_tracked_checkpoint(tmp_path):
  wd = str(tmp_path)
  os.makedirs(os.path.join(wd, 'train'))
  rows = [dict(step=20, flip_agreement=0.90, confident_ce=0.30, p_agreement=0.7),
          dict(step=40, flip_agreement=0.95, confident_ce=0.20, p_agreement=0.8),
          dict(step=60, flip_agreement=0.99, confident_ce=0.10, p_agreement=0.9),
          dict(step=40, flip_agreement=0.96, confident_ce=0.25, p_agreement=0.8)]  # a resumed rerun
  with open(os.path.join(wd, 'train', 'track.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
    f.write('{"step": 80, "flip_agr')  # a line cut by a kill mid-append
  assert [r['flip_agreement'] for r in tracking.read_track(wd)] == [0.90, 0.96, 0.99]

  def sel(rule, steps):
    return tracking.selected_step(tiny_config(**{'eval.select': rule}), wd, steps)
  assert sel('flip_agreement', [20, 40, 60]) == 60
  assert sel('flip_agreement', [20, 40]) == 40  # step 60's checkpoint is not kept
  assert sel('confident_ce', [20, 40]) == 40
  assert sel('p_agreement', [20, 40, 60]) == 20
  with pytest.raises(prepare.StageError, match='no train/track.jsonl row at a kept checkpoint'):
    sel('flip_agreement', [10, 30])
  with pytest.raises(prepare.StageError, match="eval.select='dice'"):
    sel('dice', [20])


def test_an_empty_prediction_gives_no_flip_evidence(tiny_workdir, tmp_path, monkeypatch):
  """A network that predicts nothing is perfectly flip-consistent: the signal is NaN, not 1, so
  eval.select cannot prefer a step where the network has not learned anything yet."""
  cfg = tiny_config(**{'eval.every_steps': 1})
  wd = str(tmp_path / 'wd')
  copy_inputs(tiny_workdir, wd)
  monkeypatch.setattr(sliding_window.Predictor, 'predict_volume',
                      lambda self, params, image: np.zeros(image.shape[:3], np.float32))
  tracking.track_during_training(cfg, wd, distributed.mesh())({'unet': None}, 3)
  row = tracking.read_track(wd)[0]
  assert np.isnan(row['flip_agreement'])
  assert all(np.isnan(r['flip_agreement']) for r in row['cases'].values())
  later = dict(step=6, flip_agreement=0.8)
  assert tracking.pick([row, later], 'flip_agreement')['step'] == 6


def test_false_alarm_voxels_on_lesion_free_cases_only():
  rows = [{'case': 'a', 'net_ref_voxels': 0, 'net_pred_voxels': 12, 'p_ref_voxels': 0,
           'p_pred_voxels': 0},
          {'case': 'b', 'net_ref_voxels': 30, 'net_pred_voxels': 25, 'p_ref_voxels': 30,
           'p_pred_voxels': 28},
          {'case': 'c', 'net_ref_voxels': 0, 'net_pred_voxels': 0}]  # no P for c
  fa = evaluate.false_alarm_voxels(rows)
  assert fa == {'P': {'a': 0}, 'network': {'a': 12, 'c': 0}}
  md = evaluate.summary_markdown({}, 1.0, 5, fa)
  assert 'P: a 0; network: a 12, c 0' in md


class _ConstantPredictor:
  def predict_volume(self, params, image):
    del params
    return np.full(image.shape[:3], 0.9, np.float32)


def test_case_mixture_gate_and_p():
  from cgc_jax.stages import prepare as prep_lib  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(**{'eval.gate_on_p_evidence': True, 'data.target_spacing': ()})
  rng = np.random.default_rng(0)
  vols = []
  for _ in range(4):
    v = np.zeros((30, 30, 30), np.float32)
    v[4:26, 4:26, 4:26] = 1 + 0.05 * rng.random((22, 22, 22))
    v[15:26, 4:26, 4:26] += 1  # a brighter half: the mixture's "lesion", 2 z above its ring
    vols.append(v)
  arrays, geom, _ = prep_lib.preprocess(vols, np.eye(4), cfg.data)
  args = (cfg, arrays['image'], arrays['brain'], geom, list(cfg.data.modalities), 'c')
  no, ok = {'status': 'no_lesion_evidence'}, {'status': 'ok'}
  assert masks.case_mixture(*args, stored=(no, None)) == (False, None)
  assert masks.case_mixture(*args, stored=(ok, None)) == (True, None)
  cfg.eval.gate_on_p_evidence = False
  assert masks.case_mixture(*args, stored=(no, None)) == (True, None)
  # without a report the mixture is fitted now: the bright half stands ~2 z above its ring, not 5
  cfg.eval.gate_on_p_evidence = True
  cfg.gmm.min_contrast = 5.0
  assert not masks.case_mixture(*args)[0]
  cfg.gmm.min_contrast = float('-inf')
  evidence, p = masks.case_mixture(*args)
  assert evidence and p is None  # P itself only with eval.border_mm
  cfg.eval.border_mm = 4.0
  evidence, p = masks.case_mixture(*args)  # fitted now: the mixture's P is the bright half
  assert evidence and p.dtype == bool and p.shape == arrays['brain'].shape
  from cgc_jax.labels import gmm  # pylint: disable=g-import-not-at-top
  _, want, _ = gmm.consensus(arrays['image'], arrays['brain'] > 0, list(cfg.data.modalities),
                             cfg.gmm, 'c', geom.spacing)
  assert want.any() and not want.all()
  np.testing.assert_array_equal(p, want > 0)  # the mixture the pseudo-label stage would fit
  stored_p = np.zeros((30, 30, 30), np.uint8)
  assert not masks.case_mixture(*args, stored=(ok, stored_p))[1].any()  # the stored P, as is
  # eval.border_symmetry: P's left-right symmetric voxels (the training rule's) get 0.5, no say
  stored_p[5:25, 5:9, 5:25] = 1  # a slab across the midline (axis 0): mirrored onto itself
  stored_p[20:24, 12:16, 12:16] = 1  # a one-sided blob
  cfg.train.symmetry_margin, cfg.eval.border_symmetry = 0.3, True
  _, q = masks.case_mixture(*args, stored=(ok, stored_p))
  want_sym = morphology.symmetric_lesion(
      stored_p > 0, arrays['image'][..., list(cfg.data.modalities).index('flair')],
      arrays['brain'] > 0, 0.3, cfg.train.symmetry_sigma)
  assert want_sym.sum() > 100 and not want_sym[20:24, 12:16, 12:16].any()
  np.testing.assert_array_equal(q, np.where(want_sym, 0.5, stored_p > 0).astype(np.float32))
  cfg.train.symmetry_margin, cfg.eval.border_symmetry = 0.0, False
  cfg.eval.border_mm = 0.0
  prob, mask = masks.segment_prepared(cfg, _ConstantPredictor(), None, arrays['image'],
                                         arrays['brain'], geom, evidence=True)
  assert mask.shape == (30, 30, 30) and mask.sum() == 22**3  # 0.9 everywhere in the brain
  prob, mask = masks.segment_prepared(cfg, _UnusedPredictor(), None, arrays['image'],
                                         arrays['brain'], geom, evidence=False)
  assert not prob.any() and not mask.any()  # and the network did not run
  assert prob.shape == arrays['brain'].shape and mask.shape == (30, 30, 30)


class _UnusedPredictor:
  def predict_volume(self, params, image):
    raise AssertionError('the network ran on a case without lesion evidence')


class _BlockPredictor:
  def predict_volume(self, params, image):
    del params
    prob = np.full(image.shape[:3], 0.1, np.float32)
    prob[10:20, 10:20, 10:20] = 0.9
    prob[2:4, 2:4, 2:4] = 0.9  # a satellite of 8 voxels: the component rule drops it
    return prob


def test_segment_prepared_border_mm_takes_p_near_the_border_only():
  cfg = tiny_config(**{'data.target_spacing': (), 'eval.keep_fraction': 0.5,
                       'eval.border_mm': 2.0})
  from cgc_jax.stages import prepare as prep_lib  # pylint: disable=g-import-not-at-top
  vols = [np.ones((30, 30, 30), np.float32) for _ in cfg.data.modalities]
  _, geom, _ = prep_lib.preprocess(vols, np.eye(4), cfg.data)  # 1 mm, no crop: an index map
  assert tuple(geom.prepared_shape) == (30, 30, 30)
  image = np.zeros((30, 30, 30, len(vols)), np.float32)
  brain = np.ones((30, 30, 30), bool)
  p = np.zeros((30, 30, 30), bool)
  p[8:20, 10:20, 10:20] = True  # two voxels beyond the network's mask at x = 8, 9: within 2 mm
  p[19, 10:20, 10:20] = False  # P leaves out the network's last slab (x = 19): within the band
  p[14, 14, 14] = False  # and a voxel 5 mm deep: outside the band, the network keeps it
  p[25:29, 25:29, 25:29] = True  # P's lesion far away: never enters
  p[2:4, 2:4, 2:4] = True  # P agrees with the satellite: the component rule still drops it
  want = np.zeros((30, 30, 30), bool)
  want[8:19, 10:20, 10:20] = True
  prob, mask = masks.segment_prepared(cfg, _BlockPredictor(), None, image, brain, geom, True, p)
  np.testing.assert_array_equal(mask.astype(bool), want)
  assert prob[14, 14, 14] == np.float32(0.9) and prob[8, 15, 15] == np.float32(0.51)
  cfg.eval.border_mm = 0.0  # off: the network's mask after the component rule, P unused
  want[:] = False
  want[10:20, 10:20, 10:20] = True
  _, mask = masks.segment_prepared(cfg, _BlockPredictor(), None, image, brain, geom, True, p)
  np.testing.assert_array_equal(mask.astype(bool), want)


def test_a_changed_model_is_named_before_any_checkpoint_is_read(tiny_trained):
  """Evaluating with another width names the differing field (the checkpoint's record is read
  first), instead of failing to restore arrays of another shape as an unreadable checkpoint."""
  from cgc_jax.model import checkpoint  # pylint: disable=g-import-not-at-top
  prep = paths.prepared_store(tiny_config(), tiny_trained)
  nch = prep.meta(prep.complete_cases()[0])['arrays']['image']['shape'][-1]
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r'model.base: 4 -> 8'):
    restore.restore_params(tiny_config(**{'model.base': 8}), tiny_trained, distributed.mesh(), nch)


def test_average_checkpoints_is_the_mean_of_the_kept_params(tiny_trained):
  """eval.average_checkpoints=2 on a run that kept steps 3 and 6: the params are their element-wise
  mean (NumPy reference from each checkpoint restored alone), and the step reported is 6; asking
  for more checkpoints than are kept up to eval.step averages what is there."""
  import jax  # pylint: disable=g-import-not-at-top
  prep = paths.prepared_store(tiny_config(), tiny_trained)
  nch = prep.meta(prep.complete_cases()[0])['arrays']['image']['shape'][-1]
  mesh = distributed.mesh()

  def restored(**kw):
    p, s = restore.restore_params(tiny_config(**kw), tiny_trained, mesh, nch)
    return jax.tree.map(np.asarray, jax.device_get(p)), s
  p3, s3 = restored(**{'eval.step': 3})
  p6, s6 = restored(**{'eval.step': 6})
  assert (s3, s6) == (3, 6)
  mean, s = restored(**{'eval.average_checkpoints': 2})
  assert s == 6
  leaves = jax.tree.leaves(jax.tree.map(lambda m, a, b: (m, (a.astype(np.float64) + b) / 2),
                                        mean, p3, p6), is_leaf=lambda x: isinstance(x, tuple))
  assert leaves and any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p3),
                                                              jax.tree.leaves(p6)))
  for got, want in leaves:
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  only3, s = restored(**{'eval.average_checkpoints': 5, 'eval.step': 3})
  assert s == 3
  for got, want in zip(jax.tree.leaves(only3), jax.tree.leaves(p3)):
    np.testing.assert_array_equal(got, want)


def test_statistics_csv_reads_the_written_masks(tiny_workdir, tmp_path, monkeypatch):
  """statistics.csv beside the masks: each case's volume is its written NIfTI's voxels x voxel
  volume; a case the lesion-evidence gate empties reads 0 ml, 0 components and the gate's
  verdict."""
  import csv  # pylint: disable=g-import-not-at-top
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(**{'eval.gate_on_p_evidence': True, 'eval.border_mm': 0.0})
  prep = paths.prepared_store(cfg, tiny_workdir)
  cases = prep.complete_cases()
  quiet = cases[-1]
  real = masks.case_mixture
  monkeypatch.setattr(masks, 'case_mixture', lambda c, *a: (False, None) if a[4] == quiet
                      else real(c, *a))
  out = tmp_path / 'masks'
  masks.predict_cases(cfg, prep, cases, [(None, frozenset())], _ConstantPredictor(), str(out))
  with open(out / 'statistics.csv') as f:
    rows = {r['case']: r for r in csv.DictReader(f)}
  assert list(rows) == cases
  for c in cases:
    img = nib.load(str(out / f'{c}.nii.gz'))
    voxels = int((np.asarray(img.dataobj) > 0).sum())
    ml = voxels * float(np.prod(img.header.get_zooms()[:3])) / 1000
    assert abs(float(rows[c]['lesion_ml']) - ml) < 1e-3, c
  assert rows[quiet]['lesion_ml'] == '0.0' and rows[quiet]['components'] == '0'
  assert rows[quiet]['gate'] == 'no_lesion_evidence' and rows[quiet]['mean_probability'] == ''
  assert all(rows[c]['gate'] == 'lesion' and float(rows[c]['lesion_ml']) > 0 for c in cases[:-1])
  assert all(rows[c]['mean_probability'] == '0.9' for c in cases[:-1])


def test_statistics_csv_p_agreement_is_the_dice_with_the_cases_own_p(tiny_workdir, tmp_path):
  import csv  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(**{'eval.border_mm': 4.0})
  prep, labels = paths.prepared_store(cfg, tiny_workdir), paths.pl_store(cfg, tiny_workdir)
  cases = prep.complete_cases()
  got = masks.predict_cases(cfg, prep, cases, [(None, frozenset())], _ConstantPredictor(),
                            str(tmp_path), labels)
  with open(tmp_path / 'statistics.csv') as f:
    rows = {r['case']: r for r in csv.DictReader(f)}
  for c in cases:
    p = np.asarray(labels.read(c, 'p')) > 0
    want = round(metrics.dice(got[c][0] > 0.5, p), 4)
    assert float(rows[c]['p_agreement']) == want, c
