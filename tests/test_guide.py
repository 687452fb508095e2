"""An ensemble's first network guiding the others (train.ensemble_guide): the weights it hands
them, that they reach the crops and the loss, its cache, and what makes a guided network stale."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from cgc_jax import pipeline
from cgc_jax.core import folds
from cgc_jax.core import paths
from cgc_jax.imaging import metrics
from cgc_jax.inference import restore
from cgc_jax.inference import sliding_window
from cgc_jax.model import checkpoint
from cgc_jax.runtime import distributed
from cgc_jax.training import guide
from cgc_jax.training import input_pipeline

from conftest import tiny_config


def test_voxel_weight_is_one_where_network_zero_and_p_agree():
  mask = np.array([[[1, 1, 0, 0]]], bool)
  p = np.array([[[1, 0, 1, 0]]], np.uint8)
  np.testing.assert_array_equal(guide.voxel_weight(mask, p), [[[1, 0, 0, 1]]])
  assert guide.voxel_weight(mask, p).dtype == np.float32


def test_case_weights_are_the_ranks_of_the_agreement():
  w = guide.case_weights({'a': 0.9, 'b': 0.3, 'c': 0.6, 'd': 0.6})
  assert w == pytest.approx({'a': 1.0, 'b': 0.0, 'c': 0.5, 'd': 0.5})  # ties share the mean rank
  assert guide.case_weights({'only': 0.2}) == {'only': 0.5}


def test_guided_crops_weigh_zero_where_network_zero_and_p_disagree(tiny_workdir):
  """'voxels': a case's label_weight is voxel_weight(network 0's mask, P), cropped and flipped with
  P. A stand-in mask of P xor brain disagrees with P exactly inside the brain, so the crop's weight
  is 1 - its brain (outside the scan the weight is 1 and the brain 0)."""
  cfg = tiny_config(**{'train.ensemble_guide': 'voxels'})
  prep, pl = paths.prepared_store(cfg, tiny_workdir), paths.pl_store(cfg, tiny_workdir)
  cases = pl.complete_cases()
  masks = {c: (np.asarray(pl.read(c, 'p')) > 0) ^ (np.asarray(prep.read(c, 'brain')) > 0)
           for c in cases}
  s = input_pipeline.CropSampler(prep, pl, cases, cfg.train, True, 0, 1, None, masks)
  plain = input_pipeline.CropSampler(prep, pl, cases, tiny_config().train)
  for step in range(2):
    batch = s.local_batch(step)
    assert 0 < batch['brain'].mean() < 1
    np.testing.assert_array_equal(batch['label_weight'], 1.0 - batch['brain'])
    ref = plain.local_batch(step)
    for k in ref:  # the weight changes nothing else
      np.testing.assert_array_equal(ref[k], batch[k])
  # 'cases': the batch carries the case's weight over the whole crop
  weights = {c: 0.5 * i for i, c in enumerate(cases)}
  s = input_pipeline.CropSampler(prep, pl, cases, tiny_config(**{
      'train.ensemble_guide': 'cases'}).train, True, 0, 1, weights)
  batch, ids = s.local_batch(0), s.case_ids_of(0)
  np.testing.assert_array_equal(batch['label_weight'],
                                np.stack([np.full(s.crop, weights[c], np.float32) for c in ids]))


def test_a_guide_needs_an_ensemble():
  from cgc_jax.core import config_rules  # pylint: disable=g-import-not-at-top
  assert config_rules.problems(tiny_config(**{'train.ensemble_guide': 'cases'})) == [
      "train.ensemble_guide: 'cases' (network 0 of an ensemble guides the others: expected "
      'train.ensemble >= 2, got 1)']
  assert config_rules.problems(tiny_config(**{'train.ensemble_guide': 'voxel',
                                              'train.ensemble': 2}))[0].startswith(
      "train.ensemble_guide: 'voxel' (expected one of")
  assert config_rules.problems(tiny_config(**{'train.ensemble_guide': 'voxels',
                                              'train.ensemble': 2})) == []
  # network 0 is the unguided one-network run; the others keep the guide
  c = tiny_config(**{'train.ensemble_guide': 'voxels', 'train.ensemble': 2})
  assert folds.network_config(c, 0).train.ensemble_guide == 'none'
  assert folds.network_config(c, 1).train.ensemble_guide == 'voxels'


def _metrics(run_dir):
  with open(paths.metrics_file(run_dir)) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_guided_ensemble_from_a_finished_run(tiny_trained, tmp_path, monkeypatch):
  """train.ensemble=2 with ensemble_guide='voxels' on a finished one-network run: network 0 is not
  retrained; its masks on the training cases are cached with their agreement with P (computed here
  by hand from its restored params); network 1 learns with them (a stand-in weight of 0 everywhere
  makes its segmentation loss 0 at every logged step) and records the guide. The same command again
  trains nothing and predicts no guide; 'cases' retrains network 1 only, from the cached guide."""
  wd = str(tmp_path / 'wd')
  shutil.copytree(tiny_trained, wd)
  one = tiny_config(**{'eval.pictures': False})
  mesh = distributed.mesh()
  prep, pl = paths.prepared_store(one, wd), paths.pl_store(one, wd)
  cases = prep.complete_cases()
  nch = prep.meta(cases[0])['arrays']['image']['shape'][-1]
  first = restore.restore_params(one, wd, mesh, nch)[0]
  ckpt_files = sorted(os.listdir(paths.checkpoints(wd)))
  cfg = tiny_config(**{'eval.pictures': False, 'train.ensemble': 2,
                       'train.ensemble_guide': 'voxels', 'train.log_every': 1})
  real = guide.voxel_weight
  monkeypatch.setattr(guide, 'voxel_weight', lambda mask, p: np.zeros(np.shape(p), np.float32))
  pipeline.run(cfg, wd, 'train')
  monkeypatch.setattr(guide, 'voxel_weight', real)
  assert sorted(os.listdir(paths.checkpoints(wd))) == ckpt_files
  net1 = os.path.join(wd, 'ensemble', '1')
  assert [m['seg'] for m in _metrics(net1)] == [0.0] * cfg.train.steps
  assert min(m['seg'] for m in _metrics(wd)) > 0.05
  # the cached masks: network 0's, and their agreement with P
  root = guide.guide_root(wd)
  gid = guide.identity(folds.network_config(cfg, 0), one.train.steps)
  store = guide.store_lib.Store(root, gid)
  predictor = sliding_window.Predictor(one, mesh)
  for c in cases:
    brain = np.asarray(prep.read(c, 'brain')) > 0
    want = (predictor.predict_volume(first, np.asarray(prep.read(c, 'image'), np.float32)) > 0.5
            ) & brain
    np.testing.assert_array_equal(np.asarray(store.read(c, 'mask')) > 0, want)
    assert store.meta(c)['agreement'] == pytest.approx(
        metrics.dice(want, (np.asarray(pl.read(c, 'p')) > 0) & brain), abs=1e-12)
  ckpt = checkpoint.Checkpointer(paths.checkpoints(net1), 3)
  record = ckpt.record(ckpt.latest_step())
  ckpt.close()
  assert record['guide'] == gid and record['config']['train']['ensemble_guide'] == 'voxels'
  assert record['config']['train']['seed'] == one.train.seed + 1000
  # again: nothing trained, no guide predicted
  stamp = lambda d: {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}
  before, guide_before = stamp(paths.checkpoints(net1)), stamp(os.path.join(root, 'cases'))
  pipeline.run(cfg, wd, 'train')
  assert stamp(paths.checkpoints(net1)) == before
  assert stamp(os.path.join(root, 'cases')) == guide_before
  # 'cases': network 1 is stale (a train field) and retrains; network 0 and the guide stand
  cases_cfg = tiny_config(**{'eval.pictures': False, 'train.ensemble': 2,
                             'train.ensemble_guide': 'cases', 'train.log_every': 1})
  pipeline.run(cases_cfg, wd, 'train')
  assert sorted(os.listdir(paths.checkpoints(wd))) == ckpt_files
  assert stamp(os.path.join(root, 'cases')) == guide_before
  assert max(m['seg'] for m in _metrics(net1)) > 0.05  # every case weighs > 0 but the lowest
  ckpt = checkpoint.Checkpointer(paths.checkpoints(net1), 3)
  record = ckpt.record(ckpt.latest_step())
  ckpt.close()
  assert record['guide'] == gid and record['config']['train']['ensemble_guide'] == 'cases'
  assert any(n.startswith('stale-') for n in os.listdir(net1))
  nets, _ = restore.restore_networks(cases_cfg, wd, mesh, nch)
  for a, b in zip(jax.tree.leaves(nets[0][0]), jax.tree.leaves(first)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
