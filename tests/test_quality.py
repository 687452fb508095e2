"""The label-free quality signals of P against hand counts."""
import numpy as np

from cgc_jax.labels import gmm
from cgc_jax.labels import quality


def test_shape_signals_of_a_cube_and_a_stray_voxel():
  p = np.zeros((8, 8, 8), bool)
  p[1:4, 1:4, 1:4] = True  # 27 voxels, 54 faces of 1 mm2
  p[6, 6, 6] = True  # a second component of 1 voxel
  s = quality.shape_signals(p, (1.0, 1.0, 1.0))
  assert s['compactness'] == 27 / 28
  np.testing.assert_allclose(s['sphericity'], np.pi ** (1 / 3) * (6 * 27) ** (2 / 3) / 54)
  # one voxel of 2 x 1 x 1 mm: volume 2 mm3; faces 2 x 1 + 2 x 2 + 2 x 2 = 10 mm2
  one = np.zeros((3, 3, 3), bool)
  one[1, 1, 1] = True
  np.testing.assert_allclose(quality.shape_signals(one, (2.0, 1.0, 1.0))['sphericity'],
                             np.pi ** (1 / 3) * 12 ** (2 / 3) / 10)
  assert np.isnan(quality.shape_signals(np.zeros((3, 3, 3), bool), (1, 1, 1))['sphericity'])


def test_a_ball_is_rounder_than_a_shell_of_the_same_volume():
  z, y, x = np.mgrid[:40, :40, :40] - 19.5
  r = np.sqrt(x * x + y * y + z * z)
  ball = r < 8
  shell = (r > 14) & (r < 14 + 8 ** 3 / (3 * 14 ** 2))  # about the ball's volume
  a = quality.shape_signals(ball, (1, 1, 1))['sphericity']
  b = quality.shape_signals(shell, (1, 1, 1))['sphericity']
  assert 0.6 < a <= 1.0 and b < a / 2


def test_ranks_and_the_combined_score():
  np.testing.assert_allclose(quality.ranks([3.0, 1.0, 2.0]), [1.0, 0.0, 0.5])
  np.testing.assert_allclose(quality.ranks([1.0, 1.0, 2.0]), [0.25, 0.25, 1.0])
  got = quality.ranks([np.nan, 5.0])
  assert np.isnan(got[0]) and got[1] == 0.5
  signals = {'a': {'member_agreement': 0.9, 'ring_contrast': 1.0},
             'b': {'member_agreement': 0.5, 'ring_contrast': 3.0},
             'c': {'member_agreement': 0.7, 'ring_contrast': 2.0}}
  # ranks: member a 1, b 0, c 0.5; contrast a 0, b 1, c 0.5; other signals absent everywhere
  assert quality.score(signals) == {'a': 0.5, 'b': 0.5, 'c': 0.5}
  signals['a']['compactness'], signals['b']['compactness'] = 1.0, 0.2
  signals['c']['compactness'] = 0.6
  np.testing.assert_allclose([quality.score(signals)[k] for k in 'abc'], [2 / 3, 1 / 3, 0.5])


def test_member_agreement_is_the_mean_dice_with_the_vote():
  vote = np.zeros(10, bool)
  vote[:4] = True
  same, half, other = vote.copy(), np.zeros(10, bool), np.zeros(10, bool)
  half[:2] = True  # Dice 2*2 / (2 + 4) = 2/3
  other[6:] = True  # Dice 0
  np.testing.assert_allclose(gmm.member_agreement([same, half, other], vote), (1 + 2 / 3 + 0) / 3)
  assert gmm.member_agreement([np.zeros(3, bool)], np.zeros(3, bool)) == 1.0


def test_case_signals_read_the_report_and_the_mask():
  p = np.zeros((5, 5, 5), bool)
  p[1:3, 1:3, 1:3] = True
  s = quality.case_signals({'member_agreement': 0.8, 'contrast': 1.5, 'lesion_fraction': 0.1}, p,
                           (1, 1, 1), 0.7)
  assert (s['member_agreement'], s['ring_contrast'], s['network_agreement'],
          s['volume_fraction'], s['compactness']) == (0.8, 1.5, 0.7, 0.1, 1.0)
  assert np.isnan(quality.case_signals({}, p, (1, 1, 1))['network_agreement'])


def test_case_weights_from_the_signals_known_before_training():
  signals = {'a': {'member_agreement': 0.9, 'ring_contrast': 3.0, 'network_agreement': 0.1},
             'b': {'member_agreement': 0.5, 'ring_contrast': 1.0, 'network_agreement': 0.9},
             'c': {'member_agreement': 0.7, 'ring_contrast': 2.0, 'network_agreement': 0.5}}
  # P_SIGNALS ranks: a 1, 1; b 0, 0; c 0.5, 0.5 (the network's agreement is not among them)
  assert quality.case_weights(signals, 1.0) == {'a': 1.0, 'b': 0.0, 'c': 0.5}
  assert quality.case_weights(signals, 0.5) == {'a': 1.0, 'b': 0.5, 'c': 0.75}
  assert quality.case_weights({'a': {}}, 1.0) == {'a': 1.0}  # nothing to rank: weight 1


def test_by_label_counts_what_p_holds_of_each_label_value(tiny_workdir):
  """P's voxels on each phantom's original grid (the pseudo-label stage's own NIfTI) against the
  phantom's label file, counted here by hand for every label value."""
  import glob
  import os
  import nibabel as nib
  from cgc_jax.studies import quality as quality_study
  from conftest import tiny_config
  rows = quality_study.by_label(tiny_workdir, tiny_config())
  assert rows
  for case, r in rows.items():
    p = np.asarray(nib.load(os.path.join(tiny_workdir, 'pseudo_labels', 'nifti',
                                         f'{case}.nii.gz')).dataobj) > 0
    label = np.asarray(nib.load(glob.glob(os.path.join(
        tiny_workdir, 'phantoms', case, '*_seg.nii.gz'))[0]).dataobj)
    lesion = label > 0
    if not lesion.any():
      continue
    assert abs(r['precision'] - (p & lesion).sum() / max(1, p.sum())) < 1e-12
    assert abs(r['dice'] - 2 * (p & lesion).sum() / (p.sum() + lesion.sum())) < 1e-9
    assert set(r['share']) == {int(v) for v in np.unique(label) if v > 0}
    for v, share in r['share'].items():
      assert abs(share - (p & (label == v)).sum() / (label == v).sum()) < 1e-12
