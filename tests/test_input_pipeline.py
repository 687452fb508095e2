import numpy as np
import pytest

from cgc_jax.core import paths
from cgc_jax.imaging import morphology
from cgc_jax.training import input_pipeline

from conftest import tiny_config


def _sampler(wd, cfg, pi=0, pc=1, weights=None):
  prep = paths.prepared_store(cfg, wd)
  pl = paths.pl_store(cfg, wd)
  return input_pipeline.CropSampler(prep, pl, pl.complete_cases(), cfg.train, True, pi, pc,
                                    weights)


def test_deterministic_and_process_sharded(tiny_workdir):
  cfg = tiny_config()
  a = _sampler(tiny_workdir, cfg).local_batch(5)
  b = _sampler(tiny_workdir, cfg).local_batch(5)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert a['image'].shape == (8, 16, 16, 16, 4) and a['p'].shape == (8, 16, 16, 16)
  # two processes' local batches are the halves of the one-process global batch
  halves = [_sampler(tiny_workdir, cfg, i, 2).local_batch(5) for i in range(2)]
  for k in a:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), a[k])
  # each process opened only the cases its own slots drew
  for i in range(2):
    h = _sampler(tiny_workdir, cfg, i, 2)
    h.local_batch(5)
    drawn = {h.case_ids.index(c) for c in h.case_ids_of(5)[i * 4:(i + 1) * 4]}
    assert set(h._cases) == drawn
  # another step differs
  assert not np.array_equal(_sampler(tiny_workdir, cfg).local_batch(6)['image'], a['image'])


def test_iterator_resumes_exactly(tiny_workdir):
  cfg = tiny_config()
  s = _sampler(tiny_workdir, cfg)
  full = list(s.iterate(0, 5))
  resumed = list(_sampler(tiny_workdir, cfg).iterate(3, 5))
  assert [x[0] for x in resumed] == [3, 4]
  for (_, x), (_, y) in zip(full[3:], resumed):
    np.testing.assert_array_equal(x['image'], y['image'])


@pytest.mark.parametrize('workers,prefetch', [(1, 1), (3, 2), (8, 4)])
def test_iterate_with_a_crop_per_task_gives_local_batch(tiny_workdir, workers, prefetch):
  """The iterator's threads make one crop a task, several batches ahead: every batch is
  local_batch's, bit for bit, in step order, however many threads and batches are in flight."""
  cfg = tiny_config(**{'train.num_workers': workers, 'train.prefetch': prefetch,
                       'train.symmetry_margin': 0.3})
  got = list(_sampler(tiny_workdir, cfg).iterate(2, 7))
  assert [step for step, _ in got] == [2, 3, 4, 5, 6]
  ref = _sampler(tiny_workdir, cfg)
  for step, batch in got:
    want = ref.local_batch(step)
    assert set(batch) == set(want)
    for k in want:
      np.testing.assert_array_equal(batch[k], want[k], err_msg=f'{step} {k}')


def test_a_crops_error_surfaces_from_the_iterator(tiny_workdir, monkeypatch):
  s = _sampler(tiny_workdir, tiny_config(**{'train.num_workers': 3}))

  def broken(step, slot, out=None):
    if step == 1 and slot == 5:
      raise OSError('shard unreadable')
    return input_pipeline.CropSampler.example(s, step, slot, out)

  monkeypatch.setattr(s, 'example', broken)
  it = s.iterate(0, 3)
  assert next(it)[0] == 0
  with pytest.raises(OSError, match='shard unreadable'):
    next(it)


def test_padding_and_foreground_sampling(tiny_workdir):
  cfg = tiny_config(**{'train.crop': (64, 64, 64), 'train.fg_fraction': 1.0, 'train.batch_size': 4,
                       'train.flip': False, 'train.intensity_scale': 0.0,
                       'train.intensity_shift': 0.0})
  s = _sampler(tiny_workdir, cfg)
  b = s.local_batch(0)
  assert b['image'].shape[1:4] == (64, 64, 64)  # cases are smaller: zero-padded
  assert np.all(b['image'][b['brain'] == 0] == 0)
  # no flips, no jitter, crop larger than every case: each crop holds its whole case, unchanged
  for j, cid in enumerate(s.case_ids_of(0)):
    image, p, brain, _, _, _ = s._case(s.case_ids.index(cid))
    assert b['brain'][j].sum() == np.asarray(brain).sum() > 0
    assert b['p'][j].sum() == np.asarray(p).sum()
    np.testing.assert_allclose(np.sort(b['image'][j][b['brain'][j] > 0][:, 0]),
                               np.sort(np.asarray(image, np.float32)[np.asarray(brain) > 0][:, 0]))
  lesion_cases = [i for i in range(len(s.case_ids)) if len(s._case(i)[3])]
  assert lesion_cases
  for step in range(3):
    for j, cid in enumerate(s.case_ids_of(step)):
      if len(s._case(s.case_ids.index(cid))[3]):
        assert s.local_batch(step)['p'][j].sum() > 0  # fg_fraction 1: every lesion case shows P
  cfg0 = tiny_config(**{'train.fg_fraction': 0.0})
  assert _sampler(tiny_workdir, cfg0).local_batch(0)['p'].shape == (8, 16, 16, 16)


def test_posterior_crops_follow_p_when_confidence_weights_are_on(tiny_workdir):
  cfg = tiny_config(**{'train.confidence_gamma': 1.0})
  batch = _sampler(tiny_workdir, cfg).local_batch(3)
  plain = _sampler(tiny_workdir, tiny_config()).local_batch(3)
  assert 'posterior' not in plain and batch['posterior'].shape == batch['p'].shape
  for k in plain:  # the extra array changes nothing else
    np.testing.assert_array_equal(plain[k], batch[k])
  # P is the posterior above gmm.threshold: the two crops share position and flips voxel for voxel
  assert batch['p'].sum() > 0
  np.testing.assert_array_equal(batch['posterior'] > cfg.gmm.threshold, batch['p'] > 0)


def test_label_weight_is_the_symmetry_weight_cropped_with_p(tiny_workdir, monkeypatch):
  cfg = tiny_config(**{'train.symmetry_margin': 0.3})
  plain = _sampler(tiny_workdir, tiny_config()).local_batch(3)
  # the weight volume of a case: 1 - morphology.symmetric_lesion on the configured modality
  s = _sampler(tiny_workdir, cfg)
  for ci, cid in enumerate(s.case_ids):
    image, p, brain, _, _, weight = s._case(ci)
    k = s._prep.meta(cid)['modalities'].index('flair')
    sym = morphology.symmetric_lesion(np.asarray(p) > 0, np.asarray(image[..., k], np.float32),
                                      np.asarray(brain) > 0, 0.3, 1.0)
    np.testing.assert_array_equal(weight, 1.0 - sym)
  batch = s.local_batch(3)
  assert 'label_weight' not in plain
  for k in plain:  # the extra array changes nothing else
    np.testing.assert_array_equal(plain[k], batch[k])
  # the crop follows P's position and flips: with a stand-in weight volume of 1 - brain, the
  # cropped weight is 1 - the cropped brain (outside the scan the weight is 1 and the brain 0)
  monkeypatch.setattr(input_pipeline.CropSampler, '_label_weight',
                      lambda self, cid, image, p, brain: 1.0 - np.asarray(brain, np.float32))
  batch = _sampler(tiny_workdir, cfg).local_batch(3)
  assert 0 < batch['brain'].mean() < 1
  np.testing.assert_array_equal(batch['label_weight'], 1.0 - batch['brain'])
  cfg_bad = tiny_config(**{'train.symmetry_margin': 0.3, 'train.symmetry_modality': 'dwi'})
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r"phantom_mri_00\d: train.symmetry_modality 'dwi' is not"):
    _sampler(tiny_workdir, cfg_bad).local_batch(0)


def test_quality_weight_scales_each_crop_by_its_case_weight(tiny_workdir):
  plain = _sampler(tiny_workdir, tiny_config())
  weights = {c: 0.25 * (i + 1) for i, c in enumerate(plain.case_ids)}
  s = _sampler(tiny_workdir, tiny_config(**{'train.quality_weight': 1.0}), weights=weights)
  sym = _sampler(tiny_workdir, tiny_config(**{'train.quality_weight': 1.0,
                                              'train.symmetry_margin': 0.3}), weights=weights)
  sym_only = _sampler(tiny_workdir, tiny_config(**{'train.symmetry_margin': 0.3}))
  for step in range(2):
    batch, ids = s.local_batch(step), s.case_ids_of(step)
    want = np.stack([np.full(s.crop, weights[c], np.float32) for c in ids])
    np.testing.assert_array_equal(batch['label_weight'], want)
    for k in plain.local_batch(step):  # the weight changes nothing else
      np.testing.assert_array_equal(plain.local_batch(step)[k], batch[k])
    # with the symmetry rule too: the product of both weights
    np.testing.assert_array_equal(sym.local_batch(step)['label_weight'],
                                  sym_only.local_batch(step)['label_weight'] * want)


class _FixedRng:
  """Stands in for a numpy Generator: uniform() returns the given values in order."""

  def __init__(self, *values):
    self.values = list(values)

  def uniform(self, lo, hi, size=None):
    del lo, hi
    v = self.values.pop(0)
    return np.asarray(v, np.float64) if size else float(v)


def test_spatial_coords_against_the_hand_formula():
  crop, start = (4, 6, 5), (10, 20, 30)
  k = (np.asarray(crop) - 1) / 2
  x = np.stack(np.meshgrid(*map(np.arange, crop), indexing='ij')).reshape(3, -1)
  # no rotation, no zoom: the plain crop
  c = input_pipeline.spatial_coords(crop, start, (2, 2, 2), _FixedRng([0, 0, 0], 1.0), 15, (1, 1))
  np.testing.assert_allclose(c.reshape(3, -1), x + np.asarray(start)[:, None], atol=1e-5)
  # 90 degrees about the last axis, zoom 2, isotropic: (a, b, c) -> (-b, a, c) / 2 about the centre
  c = input_pipeline.spatial_coords(crop, start, (1, 1, 1), _FixedRng([0, 0, 90], 2.0), 90, (1, 3))
  d = x - k[:, None]
  want = np.stack([-d[1], d[0], d[2]]) / 2 + (np.asarray(start) + k)[:, None]
  np.testing.assert_allclose(c.reshape(3, -1), want, atol=1e-5)
  # anisotropic voxels: the rotation is rigid in mm (distances from the centre kept, in mm)
  sp = np.asarray([1.0, 1.0, 3.0])
  c = input_pipeline.spatial_coords(crop, start, sp, _FixedRng([20, -35, 10], 1.0), 40, (1, 1))
  d_out = (c.reshape(3, -1) - (np.asarray(start) + k)[:, None]) * sp[:, None]
  np.testing.assert_allclose(np.linalg.norm(d_out, axis=0),
                             np.linalg.norm(d * sp[:, None], axis=0), rtol=1e-5)


def test_resample_reads_the_block_and_pads_with_zero():
  a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
  coords = np.asarray([[1.5, 0.0, 4.0], [2.0, 5.0, 6.0], [3.0, 1.0, 9.0]], np.float32)[..., None,
                                                                                       None]
  got = input_pipeline.resample(a, coords, 1)[:, 0, 0]
  want = [(a[1, 2, 3] + a[2, 2, 3]) / 2, a[0, 5, 1], 0.0]  # the last is outside (z = 9 >= 7)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  stacked = np.stack([a, -a], -1)
  np.testing.assert_allclose(input_pipeline.resample(stacked, coords, 0, channel=1)[:, 0, 0],
                             [-a[2, 2, 3], -a[0, 5, 1], 0.0])  # nearest: 1.5 rounds to 2


def test_rotation_off_or_identity_leaves_the_crops_unchanged(tiny_workdir):
  """spatial_p draws after every other random number: with rotation 0 and zoom 1 every crop equals
  the unaugmented one; with a real rotation, P and brain stay binary and the image is 0 outside
  the brain."""
  plain = _sampler(tiny_workdir, tiny_config()).local_batch(3)
  ident = _sampler(tiny_workdir, tiny_config(**{'train.spatial_p': 1.0, 'train.rotate_deg': 0.0,
                                                'train.zoom': (1.0, 1.0)})).local_batch(3)
  for k in plain:
    np.testing.assert_allclose(ident[k], plain[k], atol=1e-6)
  rot = _sampler(tiny_workdir, tiny_config(**{'train.spatial_p': 1.0, 'train.rotate_deg': 30.0,
                                              'train.zoom': (0.8, 1.2)})).local_batch(3)
  assert not np.allclose(rot['image'], plain['image'])
  assert set(np.unique(rot['p'])) <= {0.0, 1.0} and set(np.unique(rot['brain'])) <= {0.0, 1.0}
  assert np.all(rot['image'][rot['brain'] == 0] == 0)
  assert np.all(plain['p'] <= plain['brain'])  # P lies inside the brain, and still does, rotated
  assert rot['p'].sum() > 0 and np.all(rot['p'] <= rot['brain'])


def test_a_synthetic_batch_has_the_samplers_keys_and_shapes(tiny_workdir):
  """input_pipeline.synthetic_batch (benchmarks, exports) builds what the sampler builds, for every
  combination of the switches that add arrays."""
  prep = paths.prepared_store(tiny_config(), tiny_workdir)
  labels = paths.pl_store(tiny_config(), tiny_workdir)
  for over in ({}, {'train.confidence_gamma': 1.0}, {'train.symmetry_margin': 0.3},
               {'train.confidence_gamma': 1.0, 'train.symmetry_margin': 0.3}):
    cfg = tiny_config(**over).train
    sampler = input_pipeline.CropSampler(prep, labels, prep.complete_cases(), cfg)
    real = sampler.local_batch(0)
    fake = input_pipeline.synthetic_batch(cfg, sampler.num_channels, np.random.default_rng(0))
    assert sorted(fake) == sorted(real) == sorted(input_pipeline.batch_keys(cfg)), over
    for k in real:
      assert fake[k].shape == real[k].shape and fake[k].dtype == real[k].dtype, (over, k)


def _reference_example(s, step, slot):
  """The crop of (step, slot) computed the plain way: cut, jitter, zero outside the brain, flip."""
  cfg = s.cfg
  ci = s._case_of(step * cfg.batch_size + slot)
  rng = np.random.default_rng([cfg.seed, 2, step, slot])
  image, p, brain, fg, post, weight = s._case(ci)
  shape = image.shape[:3]
  lo = [min(0, n - c) for n, c in zip(shape, s.crop)]
  hi = [max(0, n - c) for n, c in zip(shape, s.crop)]
  if rng.random() < cfg.fg_fraction and len(fg) > 0:
    centre = fg[rng.integers(len(fg))]
    start = [int(np.clip(c - k // 2, a, b)) for c, k, a, b in zip(centre, s.crop, lo, hi)]
  else:
    start = [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
  vols = {'image': (image, 1, 0.0), 'p': (p, 0, 0.0), 'brain': (brain, 0, 0.0)}
  if post is not None:
    vols['posterior'] = (post, 1, 0.0)
  if weight is not None:
    vols['label_weight'] = (weight, 0, 1.0)
  padded = {}
  for k, (v, _, outside) in vols.items():
    big = np.full(tuple(n + 2 * c for n, c in zip(shape, s.crop)) + v.shape[3:], outside,
                  np.float32)
    big[tuple(slice(c, c + n) for c, n in zip(s.crop, shape))] = v
    padded[k] = big[tuple(slice(a + c, a + c + c) for a, c in zip(start, s.crop))]
  flips = rng.random(3) < 0.5
  c = image.shape[-1]
  scale = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, c).astype(np.float32)
  shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, c).astype(np.float32)
  if cfg.spatial_p > 0 and rng.random() < cfg.spatial_p:
    coords = input_pipeline.spatial_coords(s.crop, start, s._spacing(ci), rng, cfg.rotate_deg,
                                           cfg.zoom)
    padded = {k: (np.stack([input_pipeline.resample(v, coords, o, channel=j)
                            for j in range(v.shape[-1])], -1) if k == 'image' else
                  input_pipeline.resample(v, coords, o)) for k, (v, o, _) in vols.items()}
  padded['image'] = np.where(padded['brain'][..., None] > 0, padded['image'] * scale + shift, 0)
  if cfg.flip:
    padded = {k: np.flip(v, tuple(np.nonzero(flips)[0])) for k, v in padded.items()}
  if 'label_weight' in input_pipeline.batch_keys(cfg):
    w = np.float32(s._case_weights.get(s.case_ids[ci], 1.0))
    padded['label_weight'] = padded.get('label_weight', np.ones(s.crop, np.float32)) * w
  return padded


@pytest.mark.parametrize('over', [
    {},
    {'train.crop': (64, 40, 24), 'train.fg_fraction': 0.0},  # larger than the cases: padded
    {'train.confidence_gamma': 1.0, 'train.symmetry_margin': 0.3, 'train.quality_weight': 1.0},
    {'train.spatial_p': 0.5, 'train.rotate_deg': 20.0, 'train.confidence_gamma': 1.0,
     'train.symmetry_margin': 0.3},
    {'train.flip': False, 'train.crop': (8, 24, 16)},
])
def test_crops_equal_the_plain_cut_jitter_mask_flip_reference(tiny_workdir, over):
  """The sampler writes each crop through flipped views of the batch's rows and jitters in place:
  the batch equals, bit for bit, cutting from the zero-padded scan, jittering, zeroing outside the
  brain and flipping, for every switch that adds an array or moves voxels."""
  cfg = tiny_config(**over)
  plain = _sampler(tiny_workdir, tiny_config())
  weights = {c: 0.25 * (i + 1) for i, c in enumerate(plain.case_ids)}
  s = _sampler(tiny_workdir, cfg, weights=weights if cfg.train.quality_weight else None)
  for step in (0, 3):
    batch = s.local_batch(step)
    assert set(batch) == set(input_pipeline.batch_keys(cfg.train))
    for j in range(cfg.train.batch_size):
      want = _reference_example(s, step, j)
      assert set(want) == set(batch)
      for k in want:
        np.testing.assert_array_equal(batch[k][j], want[k], err_msg=f'{over} {step} {j} {k}')
  # the reference is not vacuous: jitter, flips and padding all happened somewhere
  assert np.any(batch['brain'] == 0) and np.any(batch['image'] != 0)
