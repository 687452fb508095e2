import nibabel as nib
import numpy as np
import pytest

from cgc_jax.imaging import geometry


def _affine(codes, spacing, origin=(10.0, -20.0, 5.0)):
  ornt = nib.orientations.axcodes2ornt(codes)
  a = np.eye(4)
  for i, (ax, flip) in enumerate(ornt):
    a[:, i] = 0
    a[int(ax), i] = flip * spacing[i]
  a[:3, 3] = origin
  return a


@pytest.mark.parametrize('codes', [('L', 'P', 'S'), ('R', 'A', 'S'), ('A', 'S', 'L'),
                                   ('I', 'R', 'P')])
@pytest.mark.parametrize('target', [(), (2.0, 2.0, 2.0), (1.3, 3.1, 2.2)])
def test_round_trip_to_original(codes, target):
  rng = np.random.default_rng(0)
  shape = (30, 26, 22)
  spacing = (1.0, 1.5, 2.5)  # anisotropic
  aff = _affine(codes, spacing)
  brain = np.zeros(shape, bool)
  brain[5:25, 4:20, 3:18] = True
  label = (brain & (rng.random(shape) > 0.8)).astype(np.uint8)
  canon, canon_aff, ornt = geometry.to_canonical(label, aff)
  assert nib.aff2axcodes(canon_aff) == ('R', 'A', 'S')
  bc, _, _ = geometry.to_canonical(brain.astype(np.uint8), aff)
  geom = geometry.plan(bc > 0, aff, shape, ornt, canon_aff, 2.0, target)
  geom = geometry.Geometry.from_json(geom.to_json())  # survives the manifest
  # the box as slices of the ORIGINAL array gives the same voxels as cropping the canonical array
  box = geometry.original_box(geom)
  np.testing.assert_array_equal(geometry.to_canonical(label[box], aff)[0],
                                canon[tuple(slice(a, b) for a, b in zip(geom.crop_start,
                                                                        geom.crop_stop))])
  # the native crop maps back EXACTLY (voxels and grid)
  native = geometry.crop_and_resample(canon, geom.native(), order=0)
  np.testing.assert_array_equal(geometry.to_original(native, geom.native()), label)
  # the prepared grid maps back with the original shape; exact when not resampled
  prepared = geometry.crop_and_resample(canon, geom, order=0)
  assert prepared.shape == tuple(geom.prepared_shape)
  back = geometry.to_original(prepared, geom, order=0)
  assert back.shape == shape
  if not target:
    np.testing.assert_array_equal(back, label)
  # the prepared affine places prepared voxel 0 where the crop box starts in world space
  start_world = canon_aff @ np.r_[geom.crop_start, 1.0]
  np.testing.assert_allclose(np.asarray(geom.prepared_affine)[:, 3], start_world, atol=1e-9)


def test_resampled_blob_survives_round_trip():
  shape = (40, 40, 30)
  aff = _affine(('L', 'P', 'S'), (1.0, 1.0, 1.5))
  g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1)
  blob = (np.sqrt((((g - [20, 18, 14]) * [1, 1, 1.5]) ** 2).sum(-1)) < 8).astype(np.uint8)
  canon, canon_aff, ornt = geometry.to_canonical(blob, aff)
  geom = geometry.plan(np.ones_like(canon, bool), aff, shape, ornt, canon_aff, 0.0, (2.0, 2.0, 2.0))
  prob = geometry.crop_and_resample(canon.astype(np.float32), geom, order=1)
  back = geometry.prob_to_original_mask(prob, geom)
  inter = (back & blob).sum()
  assert 2 * inter / (back.sum() + blob.sum()) > 0.93


def test_normalise_guards_zero_std():
  from ml_collections import ConfigDict
  img = np.ones((4, 4, 4, 2), np.float32)
  img[..., 1] = np.arange(64).reshape(4, 4, 4)
  brain = np.ones((4, 4, 4), bool)
  brain[0] = False
  out = geometry.normalise(img, brain, ConfigDict({'kind': 'mri'}))
  assert np.all(np.isfinite(out)) and np.all(out[0] == 0)
  assert abs(out[..., 1][brain].mean()) < 1e-5 and abs(out[..., 1][brain].std() - 1) < 1e-5


def _geom(native, target, shape):
  aff = np.diag(list(native) + [1.0])
  brain = np.ones(shape, bool)
  canon, canon_aff, ornt = geometry.to_canonical(brain.view(np.uint8), aff)
  return geometry.plan(canon > 0, aff, shape, ornt, canon_aff, 0.0, target)


def test_antialias_averages_noise_by_the_gaussian_of_the_scale():
  """2 mm from 1 mm: sigma (2 - 1) / 2 = 0.5 voxel per axis, so white noise keeps the fraction
  sum(k^2) of its variance per axis, k the normalised sampled Gaussian (scipy truncates at 4
  sigma: taps -2..2); the z axis (kept at 1 mm) is not filtered."""
  shape = (64, 64, 40)
  geom = _geom((1.0, 1.0, 1.0), (2.0, 2.0, 1.0), shape)
  noise = np.random.default_rng(0).standard_normal(shape + (1,)).astype(np.float32)
  out = geometry.antialias(noise, np.ones(shape, bool), geom)
  x = np.arange(-2, 3)
  k = np.exp(-x ** 2 / (2 * 0.25))
  k /= k.sum()
  expected = (k ** 2).sum() ** 2  # two filtered axes
  inner = out[8:-8, 8:-8, 8:-8, 0]
  np.testing.assert_allclose(inner.var(), expected * noise[8:-8, 8:-8, 8:-8, 0].var(), rtol=0.03)
  # one voxel against the filter written out by hand
  i, j, l = 20, 30, 17
  ref = np.einsum('a,b,abc->c', k, k, noise[i - 2:i + 3, j - 2:j + 3, :, 0])[l]
  np.testing.assert_allclose(out[i, j, l, 0], ref, rtol=1e-4, atol=1e-5)


def test_antialias_keeps_the_brain_edge_and_the_outside():
  """Averaged over the brain only: a constant brain stays constant up to its edge (the zeros
  outside do not darken it), the outside is returned as it was, and a grid that is not coarser
  than the scan is not filtered at all."""
  shape = (30, 30, 30)
  brain = np.zeros(shape, bool)
  brain[5:25, 5:25, 5:25] = True
  img = np.where(brain, 3.0, 0.0).astype(np.float32)[..., None]
  out = geometry.antialias(img, brain, _geom((1.0, 1.0, 1.0), (2.0, 2.0, 2.0), shape))
  np.testing.assert_allclose(out[..., 0][brain], 3.0, rtol=1e-5)
  np.testing.assert_array_equal(out[..., 0][~brain], 0.0)
  same = _geom((2.0, 2.0, 2.0), (2.0, 2.0, 2.0), shape)
  assert geometry.antialias(img, brain, same) is img
