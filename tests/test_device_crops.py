"""Crops cut on the devices (training/device_crops.py) against the host sampler's."""
import os

import jax
import numpy as np
import pytest

from cgc_jax.core import paths
from cgc_jax.runtime import distributed
from cgc_jax.training import device_crops
from cgc_jax.training import input_pipeline

from conftest import tiny_config


def _sampler(wd, cfg, pi=0, pc=1, weights=None):
  prep = paths.prepared_store(cfg, wd)
  pl = paths.pl_store(cfg, wd)
  return input_pipeline.CropSampler(prep, pl, pl.complete_cases(), cfg.train, True, pi, pc,
                                    weights)


def test_canvas_holds_every_corner_the_sampler_draws():
  """Per axis: a case smaller than the crop sits crop - size in (its corners run from size - crop
  to 0), a larger one at 0 (corners 0 to size - crop); the canvas is the largest reach."""
  shape, offsets = device_crops.canvas([(10, 30, 16), (20, 12, 16)], (16, 16, 16))
  np.testing.assert_array_equal(offsets, [[6, 0, 0], [0, 4, 0]])
  assert shape == (22, 30, 16)  # 6 + 16 and 0 + 20; 0 + 30 and 4 + 16; 16
  for size, off, length in ((10, 6, 22), (20, 0, 22), (30, 0, 30), (12, 4, 30)):
    for corner in (min(0, size - 16), max(0, size - 16)):  # the sampler's extreme corners
      assert 0 <= corner + off and corner + off + 16 <= length


@pytest.mark.parametrize('overrides', [
    {},  # the tiny cases are larger than the crop on every axis
    # a crop larger than the cases on two axes (padding), with P's posterior and symmetry weights
    {'train.crop': (40, 12, 40), 'train.confidence_gamma': 1.0, 'train.symmetry_margin': 0.3},
])
def test_device_batches_are_the_host_batches(tiny_workdir, overrides):
  """Every array of every step equals the host sampler's global batch: P, the brain mask, the
  posterior and the weights exactly, the jittered image to a float32 rounding; on 8 devices, each
  holding its own rows."""
  cfg = tiny_config(**overrides)
  mesh = distributed.mesh()
  weights = None
  host = _sampler(tiny_workdir, cfg)
  if 'train.symmetry_margin' in overrides:  # per-case weights too
    weights = {c: 0.5 + 0.25 * i for i, c in enumerate(host.case_ids)}
    host = _sampler(tiny_workdir, cfg, weights=weights)
  dev = device_crops.DeviceCrops(_sampler(tiny_workdir, cfg, weights=weights), mesh)
  assert dev.nbytes == sum(np.asarray(a).nbytes for a in dev.arrays.values())
  assert jax.device_count() == 8  # each device cuts its own rows
  for step, got in dev.iterate(3, 6):
    for v in got.values():
      assert v.sharding.is_equivalent_to(distributed.data_sharding(mesh), v.ndim)
      assert len(v.addressable_shards) == 8
    want = host.local_batch(step)
    assert set(got) == set(want) == set(input_pipeline.batch_keys(cfg.train))
    for k, w in want.items():
      g = np.asarray(got[k])
      assert g.dtype == w.dtype and g.shape == w.shape, k
      if k == 'image':
        np.testing.assert_allclose(g, w, rtol=2e-7, atol=1e-6, err_msg=f'{step} {k}')
        assert np.array_equal(g == 0, w == 0)  # the same voxels zeroed outside the brain
      else:
        np.testing.assert_array_equal(g, w, err_msg=f'{step} {k}')
    if 'train.crop' in overrides:  # the crops reach past the cases: padding was exercised
      assert (np.asarray(got['brain']) == 0).any()
    if weights:
      assert len(np.unique(np.asarray(got['label_weight']))) > 2  # voxel and case weights


def test_two_processes_draw_their_own_slots(tiny_workdir):
  """Each process draws only its own slots; the two halves are the one-process draws."""
  cfg = tiny_config()
  mesh = distributed.mesh()
  whole = device_crops.DeviceCrops(_sampler(tiny_workdir, cfg), mesh, place=False).draws(4)
  halves = [device_crops.DeviceCrops(_sampler(tiny_workdir, cfg, i, 2), mesh,
                                     place=False).draws(4) for i in range(2)]
  for k in device_crops.DRAW_FIELDS:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])


def test_rotation_stays_on_the_host(tiny_workdir):
  cfg = tiny_config(**{'train.spatial_p': 0.5})
  with pytest.raises(ValueError, match='train.spatial_p = 0'):
    device_crops.DeviceCrops(_sampler(tiny_workdir, cfg), distributed.mesh())


@pytest.mark.slow  # a tiny training (~15 s): the whole suite runs it
def test_training_on_device_crops_follows_the_host_run(tiny_workdir, tiny_trained, tmp_path,
                                                       caplog):
  """The train stage with train.crops_on = device runs the host path's six steps (tiny_trained's
  run: 'auto' cuts on the host on CPUs), and the cases were held on the devices. The images differ
  by a float32 rounding, which the steps amplify (Adam turns the rounding noise of a gradient that
  is zero in theory, a bias before a norm, into steps of the learning rate): the first two steps'
  loss terms agree to 1e-6, all six to 1e-3."""
  import json  # pylint: disable=g-import-not-at-top

  from cgc_jax.stages import train  # pylint: disable=g-import-not-at-top

  from conftest import copy_inputs  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / 'device')
  copy_inputs(tiny_workdir, wd)
  with caplog.at_level('INFO'):
    train.train_and_evaluate(tiny_config(**{'train.crops_on': 'device'}), wd)
  assert 'cases on each device' in caplog.text
  logs = {}
  for where, d in (('host', tiny_trained), ('device', wd)):
    with open(os.path.join(d, 'train', 'metrics.jsonl')) as f:
      logs[where] = [json.loads(line) for line in f]
  assert [r['step'] for r in logs['device']] == [r['step'] for r in logs['host']] == list(
      range(1, 7))
  for h, d in zip(logs['host'], logs['device']):
    for k in ('loss', 'seg', 'coarse', 'fine'):
      rel = 1e-6 if h['step'] <= 2 else 1e-3
      assert d[k] == pytest.approx(h[k], rel=rel, abs=1e-8), (h['step'], k)


class _Device:
  def __init__(self, platform, limit):
    self.platform, self._limit = platform, limit

  def memory_stats(self):
    return {'bytes_limit': self._limit}


def test_auto_cuts_on_accelerators_when_the_cases_fit(tiny_workdir):
  """'auto': the host on CPUs; on GPUs and TPUs the devices when the canvases (counted from the
  shards' records) take at most train.crops_device_memory of the smallest device's memory."""
  cfg = tiny_config()
  s = _sampler(tiny_workdir, cfg)
  records = s.image_records()
  shape, _ = device_crops.canvas([r['shape'][:3] for r in records], s.crop)
  itemsize = np.dtype(records[0]['dtype']).itemsize
  need = len(records) * int(np.prod(shape)) * (4 * itemsize + 2)  # 4 channels, p and brain
  assert device_crops.canvas_bytes([r['shape'][:3] for r in records], s.crop, 4, itemsize,
                                   input_pipeline.batch_keys(cfg.train)) == need
  dev = device_crops.DeviceCrops(s, distributed.mesh())
  assert dev.nbytes == need  # the estimate is what the devices hold
  assert device_crops.choose(s, [_Device('cpu', 10 * need)])[0] is False
  assert device_crops.choose(s, [_Device('gpu', 4 * need)] * 2) == (
      True, f'auto: gpu, the cases need {need / 1e9:.2f} GB a device')
  on, why = device_crops.choose(s, [_Device('tpu', 4 * need), _Device('tpu', 4 * need - 8)])
  assert not on and 'train.crops_device_memory' in why  # the smallest device decides
  for setting in ('host', 'device'):
    forced = _sampler(tiny_workdir, tiny_config(**{'train.crops_on': setting}))
    assert device_crops.choose(forced, [_Device('gpu', 0)])[0] is (setting == 'device')
  rotated = _sampler(tiny_workdir, tiny_config(**{'train.spatial_p': 0.5}))
  assert device_crops.choose(rotated, [_Device('gpu', 100 * need)])[0] is False
