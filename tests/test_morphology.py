import numpy as np
import pytest

from cgc_jax.imaging import morphology


def _blobs():
  m = np.zeros((12, 12, 12), bool)
  m[1:5, 1:5, 1:5] = True  # 64 voxels
  m[8:10, 8:10, 8:10] = True  # 8 voxels
  m[6, 6, 6] = True  # 1 voxel: touches neither (gaps of >= 1 voxel on some axis)
  return m


def test_components_sizes_and_26_connectivity():
  m = np.zeros((4, 4, 4), bool)
  m[0, 0, 0] = m[1, 1, 1] = True  # corner neighbours: one component under 26-connectivity
  m[3, 3, 3] = True
  lab, sizes = morphology.components(m)
  assert sorted(sizes.tolist()) == [1, 2]
  assert lab[0, 0, 0] == lab[1, 1, 1] != lab[3, 3, 3]


def test_remove_small_and_keep_major_by_hand():
  m = _blobs()
  assert morphology.remove_small(m, 8).sum() == 64 + 8
  assert morphology.remove_small(m, 9).sum() == 64
  assert morphology.remove_small(m, 0).sum() == 73
  # 8 / 64 = 0.125: kept at fraction 0.1, dropped at 0.2; the single voxel dropped at both
  assert morphology.keep_major(m, 0.1).sum() == 72
  assert morphology.keep_major(m, 0.2).sum() == 64
  assert morphology.keep_major(m, 1.0).sum() == 64
  assert not morphology.keep_major(np.zeros_like(m), 0.5).any()


def test_fill_holes_3d_and_slicewise():
  m = np.zeros((9, 9, 9), bool)
  m[1:8, 1:8, 1:8] = True
  m[3:6, 3:6, 3:6] = False  # enclosed cavity: 27 voxels
  assert morphology.fill_holes(m).sum() == 343
  # a cavity open to the outside along z (a tunnel) is not a 3D hole, but is one in every axial
  # slice
  t = np.zeros((9, 9, 9), bool)
  t[1:8, 1:8, :] = True
  t[4, 4, :] = False
  assert not morphology.ndimage.binary_fill_holes(t)[4, 4, :].any()
  assert morphology.fill_holes(t)[4, 4, :].all()
  assert morphology.fill_holes(t).sum() == 7 * 7 * 9


def test_cleanup_order_and_brain_restriction():
  brain = np.ones((12, 12, 12), bool)
  m = _blobs()
  m[2:4, 2:4, 2:4] = False  # a hole inside the big blob
  out = morphology.cleanup(m, brain, open_iterations=0, keep_fraction=0.5, min_voxels=2, fill=True)
  want = np.zeros_like(m)
  want[1:5, 1:5, 1:5] = True
  np.testing.assert_array_equal(out, want)
  brain[:, :, :3] = False
  out = morphology.cleanup(m, brain, 0, 0.5, 2, True)
  np.testing.assert_array_equal(out, want & brain)
  # opening with the 6-neighbour cross: the 4^3 cube erodes to its 2^3 core and grows back by one
  # face layer (8 + 6 x 4 = 32 voxels); the 2^3 blob and the single voxel erode away entirely
  o = morphology.cleanup(_blobs(), np.ones_like(brain), 1, 0.0, 0, False)
  assert o.sum() == 32 and o[2:4, 2:4, 2:4].all() and not o[8:10, 8:10, 8:10].any()


def test_grow_matches_brute_force_distances():
  rng = np.random.default_rng(0)
  m = rng.random((9, 8, 7)) > 0.93
  spacing = (2.0, 1.0, 3.0)
  pts = np.argwhere(m) * spacing
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in m.shape], indexing='ij'), -1) * spacing
  dist = np.sqrt(((grid[..., None, :] - pts) ** 2).sum(-1)).min(-1)
  for mm in (1.0, 2.0, 3.5):
    np.testing.assert_array_equal(morphology.grow(m, mm, spacing), dist <= mm)
  np.testing.assert_array_equal(morphology.grow(m, 0.0, spacing), m)
  # at 2 mm isotropic, 2 mm adds exactly the 6 face neighbours
  one = np.zeros((5, 5, 5), bool)
  one[2, 2, 2] = True
  assert morphology.grow(one, 2.0, (2.0, 2.0, 2.0)).sum() == 7


def test_filter_components_by_volume_and_confidence():
  prob = np.zeros((10, 10, 10), np.float32)
  prob[1:4, 1:4, 1:4] = 0.9  # 27 voxels, sure
  prob[6:8, 6:8, 6:8] = 0.6  # 8 voxels, unsure
  prob[0, 9, 9] = 0.99  # 1 voxel
  prob[5, 0, 0] = 0.3  # below the threshold: never a component, left as it is
  sp = (2.0, 2.0, 2.0)  # 8 mm^3 per voxel
  out = morphology.filter_components(prob, sp, min_mm3=64.0, min_probability=0.0)
  assert out[1:4, 1:4, 1:4].min() == np.float32(0.9) and out[6:8, 6:8, 6:8].min() == np.float32(0.6)
  assert out[0, 9, 9] == 0 and out[5, 0, 0] == np.float32(0.3)  # 8 mm^3 < 64 mm^3: dropped
  out = morphology.filter_components(prob, sp, min_mm3=0.0, min_probability=0.75)
  assert out[6:8, 6:8, 6:8].max() == 0 and out[0, 9, 9] == np.float32(0.99)
  np.testing.assert_array_equal(morphology.filter_components(prob, sp, 0.0, 0.0), prob)


def test_filter_components_relative_to_the_largest():
  prob = np.zeros((12, 12, 12), np.float32)
  prob[0:4, 0:4, 0:4] = 0.9  # 64 voxels: the largest
  prob[6:10, 6:10, 6:8] = 0.8  # 32 voxels: exactly half of it
  prob[0:3, 8:11, 8:11] = 0.7  # 27 voxels: 0.42 of it
  prob[11, 0, 11] = 0.99  # 1 voxel
  sp = (1.0, 1.0, 1.0)
  out = morphology.filter_components(prob, sp, 0.0, 0.0, keep_fraction=0.5)
  kept = {(0, 0, 0): 0.9, (6, 6, 6): 0.8, (0, 8, 8): 0.0, (11, 0, 11): 0.0}
  for (x, y, z), want in kept.items():
    assert out[x, y, z] == np.float32(want), (x, y, z)
  assert (out > 0.5).sum() == 64 + 32
  out = morphology.filter_components(prob, sp, 0.0, 0.0, keep_fraction=1.0)  # the largest only
  assert (out > 0.5).sum() == 64 and out[0:4, 0:4, 0:4].min() == np.float32(0.9)
  np.testing.assert_array_equal(morphology.filter_components(prob, sp, 0.0, 0.0, 0.4), np.where(
      prob == np.float32(0.99), 0, prob))  # 27 >= 0.4 x 64 kept; the single voxel dropped
  # the fraction counts against the largest component the other rules keep: with the 64 voxels
  # unsure (0.6 < 0.65), the 32-voxel one is the largest and the 27-voxel one is 0.84 of it
  unsure = np.where(prob == np.float32(0.9), np.float32(0.6), prob)
  out = morphology.filter_components(unsure, sp, 0.0, 0.65, keep_fraction=0.8)
  assert out[0, 0, 0] == 0 and out[11, 0, 11] == 0
  assert out[6, 6, 6] == np.float32(0.8) and out[0, 8, 8] == np.float32(0.7)
  assert (out > 0.5).sum() == 32 + 27


def test_refine_border_by_hand():
  # The network's mask: x in 4..11 (8 voxels) on a 1 x 1 x 20 line of 2 mm voxels, prob 0.9 inside
  # and 0.1 outside; band of 4 mm = 2 voxels either side of the border.
  prob = np.full((1, 1, 20), 0.1, np.float32)
  prob[0, 0, 4:12] = 0.9
  p = np.zeros((1, 1, 20), bool)
  p[0, 0, 2:11] = True  # P: two voxels more on the left (in the band), one fewer on the right
  p[0, 0, 7] = False  # a hole deep inside the mask: 4 voxels (8 mm) from the outside, not in band
  p[0, 0, 17:19] = True  # a far blob: 6+ voxels from the mask, not in the band
  out = morphology.refine_border(prob, p, (2.0, 2.0, 2.0), 4.0)
  want = prob.copy()
  want[0, 0, 2:4] = 0.51  # P's side, in the band: added
  want[0, 0, 11] = 0.49  # P's side, in the band (a border voxel): removed
  np.testing.assert_array_equal(out, want)
  # distances are in mm: at 1 mm spacing the same 4 mm reach 4 voxels, and the hole at x = 7 (four
  # voxels from the outside at x = 3, within 4 mm) leaves the mask; the far blob stays out
  out1 = morphology.refine_border(prob, p, (1.0, 1.0, 1.0), 4.0)
  assert out1[0, 0, 7] == np.float32(0.49) and (out1[0, 0, 17:19] == 0.1).all()
  # P agrees with the network's side: the network's own value stays
  np.testing.assert_array_equal(morphology.refine_border(prob, prob > 0.5, (2, 2, 2), 4.0), prob)
  np.testing.assert_array_equal(morphology.refine_border(prob, p, (2, 2, 2), 0.0), prob)
  empty = np.zeros_like(prob)
  np.testing.assert_array_equal(morphology.refine_border(empty, p, (2, 2, 2), 4.0), empty)
  # P with no say (0.5) on two band voxels: there the network's value stays, elsewhere as above
  q = p.astype(np.float32)
  q[0, 0, 2] = q[0, 0, 11] = 0.5
  want3 = want.copy()
  want3[0, 0, 2], want3[0, 0, 11] = 0.1, 0.9
  np.testing.assert_array_equal(morphology.refine_border(prob, q, (2.0, 2.0, 2.0), 4.0), want3)


def test_refine_border_reflect_keeps_the_networks_confidence_on_ps_side():
  # test_refine_border_by_hand's line: the network 0.9 on x = 4..11 and 0.1 elsewhere; P adds x = 2,
  # 3 and removes x = 11 in the band. 'reflect' mirrors the network's value about 0.5 there.
  prob = np.full((1, 1, 20), 0.1, np.float32)
  prob[0, 0, 4:12] = 0.9
  prob[0, 0, 3] = 0.3  # the network less sure of this one
  p = np.zeros((1, 1, 20), bool)
  p[0, 0, 2:11] = True
  out = morphology.refine_border(prob, p, (2.0, 2.0, 2.0), 4.0, side='reflect')
  want = prob.copy()
  want[0, 0, 2], want[0, 0, 3], want[0, 0, 11] = 0.9, 0.7, 0.1  # 1 - 0.1, 1 - 0.3, 1 - 0.9
  np.testing.assert_allclose(out, want, atol=1e-6)
  # where P and the network agree both sides are the network's own, as with 'clamp'
  np.testing.assert_array_equal(
      morphology.refine_border(prob, prob > 0.5, (2, 2, 2), 4.0, side='reflect'), prob)
  # the edge on a grid twice as fine (linear interpolation, threshold 0.5) between x = 10 (0.9)
  # and x = 11 (removed): 'clamp' leaves 0.49 there and the edge next to x = 11 (0.9 -> 0.49
  # crosses 0.5 at 0.976 of the gap); 'reflect' leaves 0.1 and the edge half-way, where P's own
  # 1 -> 0 would put it
  clamp = morphology.refine_border(prob, p, (2.0, 2.0, 2.0), 4.0)
  for arr, frac in ((clamp, (0.9 - 0.5) / (0.9 - 0.49)), (out, 0.5)):
    a, b = float(arr[0, 0, 10]), float(arr[0, 0, 11])
    assert (a - 0.5) / (a - b) == pytest.approx(frac, abs=1e-6)
  with pytest.raises(ValueError, match='clamp'):
    morphology.refine_border(prob, p, (2.0, 2.0, 2.0), 4.0, side='nearest')


def test_mirror_about_a_shifted_plane_and_the_shift_of_an_off_centre_brain():
  a = np.arange(6)
  np.testing.assert_array_equal(morphology.mirror(a, 0), [5, 4, 3, 2, 1, 0])  # plane x = 2.5
  np.testing.assert_array_equal(morphology.mirror(a, 2), [1, 0, 5, 4, 3, 2])  # plane x = 3.5
  # a brain symmetric about x = 7 on a 12-voxel axis: the plane (12 - 1 + s) / 2 = 7 needs s = 3
  brain = np.zeros((12, 3, 3), bool)
  brain[3:12, 1, 1] = True  # x = 3..11, centre 7
  brain[5:10, 0, 1] = True  # x = 5..9, centre 7
  assert morphology.mirror_shift(brain) == 3
  np.testing.assert_array_equal(morphology.mirror(brain, 3)[1:], brain[1:])  # wrap aside
  assert morphology.mirror_shift(np.ones((8, 2, 2), bool)) == 0  # ties: the smallest shift


def test_symmetric_lesion_by_hand():
  # 10 voxels left-right, brain everywhere (mirror x <-> 9 - x), no smoothing, margin 0.5
  p = np.zeros((10, 1, 2), bool)
  ch = np.zeros((10, 1, 2), np.float32)
  p[[2, 7], 0, 0] = True  # a pair, equally bright: both are returned
  ch[[2, 7], 0, 0] = 1.0
  p[3, 0, 1] = True  # one-sided (its mirror x = 6 is not P): kept
  ch[3, 0, 1] = 1.0
  p[[1, 8], 0, 1] = True  # a pair, x = 1 brighter by 2.5: only the dim side (x = 8) is returned
  ch[1, 0, 1], ch[8, 0, 1] = 3.0, 0.5
  p[[4, 5], 0, 0] = True  # a pair that differs by 0.4 < margin: both returned
  ch[4, 0, 0], ch[5, 0, 0] = 1.4, 1.0
  got = morphology.symmetric_lesion(p, ch, np.ones_like(p), margin=0.5, sigma=0.0)
  want = np.zeros_like(p)
  want[[2, 7, 4, 5], 0, 0] = True
  want[8, 0, 1] = True
  np.testing.assert_array_equal(got, want)
  # smoothing is applied before the difference: a Gaussian of the channel, by scipy's own filter
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  sm = ndimage.gaussian_filter(ch, 1.0)
  diff = sm - sm[::-1]
  want = p & p[::-1] & (diff < 0.5)
  np.testing.assert_array_equal(
      morphology.symmetric_lesion(p, ch, np.ones_like(p), margin=0.5, sigma=1.0), want)


def test_edge_components_without_p_are_dropped_and_the_rest_kept():
  brain = np.zeros((20, 20, 20), bool)
  brain[2:18, 2:18, 2:18] = True
  prob = np.zeros(brain.shape, np.float32)
  prob[2:4, 8:11, 8:11] = 0.9  # at the edge (depth 1-2 voxels), P does not touch it: dropped
  prob[2:4, 13:16, 13:16] = 0.8  # at the edge, P touches one voxel: kept
  prob[9:12, 9:12, 9:12] = 0.7  # deep in the brain, no P: kept (a lesion P missed)
  p = np.zeros(brain.shape, bool)
  p[3, 14, 14] = True
  out = morphology.drop_edge_components(prob, p, brain, (2.0, 2.0, 2.0), 4.0)
  want = prob.copy()
  want[2:4, 8:11, 8:11] = 0
  np.testing.assert_array_equal(out, want)
  # depth in mm: at 1 mm voxels the component's two planes lie 1 and 2 mm deep: within 1 mm, half
  # of it (dropped); within 0.5 mm, none of it (kept)
  assert morphology.drop_edge_components(prob, p, brain, (1.0, 1.0, 1.0), 1.0)[2, 9, 9] == 0
  kept = morphology.drop_edge_components(prob, p, brain, (1.0, 1.0, 1.0), 0.5)
  assert kept[2, 9, 9] == prob[2, 9, 9]
  np.testing.assert_array_equal(morphology.drop_edge_components(prob, p, brain, (1, 1, 1), 0.0),
                                prob)
