import numpy as np
import pytest

from cgc_jax.imaging import metrics


def _surface_ref(m):
  """Surface voxels by definition: in the mask with a 6-neighbour outside it (or off the array)."""
  p = np.pad(m, 1)
  inner = p[1:-1, 1:-1, 1:-1]
  nb = [p[2:, 1:-1, 1:-1], p[:-2, 1:-1, 1:-1], p[1:-1, 2:, 1:-1], p[1:-1, :-2, 1:-1],
        p[1:-1, 1:-1, 2:], p[1:-1, 1:-1, :-2]]
  return inner & ~np.logical_and.reduce(nb)


def _assd_bruteforce(a, b, spacing):
  sa = np.argwhere(_surface_ref(a)) * spacing
  sb = np.argwhere(_surface_ref(b)) * spacing
  d = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1))
  ab, ba = d.min(1), d.min(0)
  pooled = np.hstack([ab, ba])
  return pooled.mean(), np.percentile(pooled, 95)


def test_dice_and_sensitivity_hand_computed():
  ref = np.zeros((4, 4, 4), bool)
  ref[0, 0, :4] = True  # 4 voxels
  pred = np.zeros_like(ref)
  pred[0, 0, 2:4] = True  # 2 voxels, both in ref
  pred[3, 3, 3] = True  # 1 false positive
  assert metrics.dice(pred, ref) == pytest.approx(2 * 2 / (3 + 4))
  assert metrics.sensitivity(pred, ref) == pytest.approx(2 / 4)


def test_assd_two_voxels_anisotropic():
  a = np.zeros((3, 3, 6), bool)
  b = np.zeros_like(a)
  a[1, 1, 0] = True
  b[1, 1, 3] = True
  # one surface voxel each, 3 voxels apart along an axis of 2.5 mm spacing
  assert metrics.assd(a, b, (1.0, 1.0, 2.5)) == pytest.approx(7.5)
  assert metrics.hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(7.5)


def test_assd_shifted_cube_hand_computed():
  a = np.zeros((8, 8, 8), bool)
  a[2:5, 2:5, 2:5] = True
  b = np.roll(a, 1, axis=0)
  # 3x3x3 cube: 26 surface voxels. Shifted by one voxel (2 mm) along x: the 9 voxels of a's x=2
  # face are 2 mm from b's surface; a's surface voxel (4, 3, 3) is b's centre, 1 mm (one y step)
  # from b's surface; the other 16 lie on b's surface. a->b = (9 * 2 + 1) / 26; b->a the same.
  assert metrics.assd(a, b, (2.0, 1.0, 1.0)) == pytest.approx(19.0 / 26)


def test_assd_matches_bruteforce_on_random_blobs():
  rng = np.random.default_rng(0)
  for spacing in [(1.0, 1.0, 1.0), (0.8, 1.3, 3.0)]:
    a = rng.random((12, 10, 9)) > 0.6
    b = rng.random((12, 10, 9)) > 0.5
    want_assd, want_hd = _assd_bruteforce(a, b, np.asarray(spacing))
    assert metrics.assd(a, b, spacing) == pytest.approx(want_assd, rel=1e-9)
    assert metrics.hd95(a, b, spacing) == pytest.approx(want_hd, rel=1e-9)


def test_assd_pools_both_directions_hand_computed():
  # a: one voxel; b: a 1x1x3 bar whose middle voxel is a. a->b: 0 (a lies on b's surface). b->a:
  # 1, 0, 1 mm. Pooled: (0 + 1 + 0 + 1) / 4 = 0.5; the mean of one-way means would be (0 + 2/3) / 2.
  a = np.zeros((5, 5, 5), bool)
  b = np.zeros_like(a)
  a[2, 2, 2] = True
  b[2, 2, 1:4] = True
  assert metrics.assd(a, b) == pytest.approx(0.5)
  assert metrics.assd(b, a) == pytest.approx(0.5)


def test_empty_conventions():
  e = np.zeros((4, 4, 4), bool)
  m = e.copy()
  m[1, 1, 1] = True
  assert metrics.dice(e, e) == 1.0 and metrics.assd(e, e) == 0.0 and metrics.hd95(e, e) == 0.0
  assert metrics.dice(e, m) == 0.0 and np.isnan(metrics.assd(e, m)) and np.isnan(metrics.assd(m, e))
  s = metrics.summarise(
      [metrics.all_metrics(e, m, (1, 1, 1)),
       metrics.all_metrics(m, m, (1, 1, 1))])
  assert s['assd']['nan_cases'] == 1 and s['empty_pred_cases'] == 1
  assert s['dice']['mean'] == pytest.approx(0.5)
  assert s['assd']['mean'] == 0.0  # NaN excluded from the mean, counted above


# medpy 0.5.2's binary.dc, binary.hd95 and binary.assd (voxelspacing (0.9, 1.3, 3.0)) on the masks
# below, computed once with medpy installed (it is not a dependency): (dc, hd95, assd).
_MEDPY_0_5_2 = [(0.5407388001047944, 5.187358834878748, 1.7666455574584456),
                (0.3379350573595178, 6.177378084592201, 2.3431720450018),
                (0.34419317746262934, 6.096720429870473, 2.193928997199459),
                (0.4162909090909091, 5.0019996001599205, 1.9737922796993672)]


def test_dice_hd95_assd_equal_medpys_on_anisotropic_random_masks():
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2026)
  for want in _MEDPY_0_5_2:
    shape = (20, 24, 16)
    a = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 2) > 0.5)
    b = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 2) > 0.5)
    m = metrics.all_metrics(a.astype(np.uint8), b.astype(np.uint8), (0.9, 1.3, 3.0))
    np.testing.assert_allclose([m['dice'], m['hd95'], m['assd']], want, rtol=1e-12)


def test_lesion_statistics_by_hand():
  """Two 26-connected pieces (a 2x2x2 cube and a diagonal pair) at 1 x 2 x 3 mm voxels."""
  m = np.zeros((8, 8, 8), bool)
  m[1:3, 1:3, 1:3] = True
  m[5, 5, 5] = m[6, 6, 6] = True  # corner neighbours: one piece under 26-connectivity
  prob = np.where(m, 0.75, 0.1)
  prob[1, 1, 1] = 0.95
  r = metrics.lesion_statistics('x', m, (1.0, 2.0, 3.0), prob, 'lesion')
  assert r == {'case': 'x', 'lesion_ml': 0.06, 'components': 2, 'largest_ml': 0.048,
               'mean_probability': round((0.95 + 9 * 0.75) / 10, 4), 'gate': 'lesion'}
  empty = metrics.lesion_statistics('y', np.zeros((4, 4, 4)), (1, 1, 1), np.zeros((4, 4, 4)),
                                    'no_lesion_evidence')
  assert empty == {'case': 'y', 'lesion_ml': 0.0, 'components': 0, 'largest_ml': 0.0,
                   'mean_probability': '', 'gate': 'no_lesion_evidence'}
  assert list(r) == list(metrics.STATISTICS)
