"""Phantoms: real MNI152 anatomy, BraTS-like MRI and CQ500-like CT, read back by the readers."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
from ml_collections import ConfigDict
from scipy import ndimage

from cgc_jax.core import paths
from cgc_jax.imaging import phantoms
from cgc_jax.imaging import readers
from cgc_jax.stages import prepare
from cgc_jax.stages import pseudo_labels

from conftest import ct_phantom_config, tiny_config


def test_mri_phantoms_layout_labels_and_lesion_free(tiny_workdir):
  cfg = tiny_config()
  files = prepare.case_files(cfg, tiny_workdir)
  assert [f.case_id for f in files] == ['phantom_mri_000', 'phantom_mri_001', 'phantom_mri_002']
  rc = phantoms.reader_config(cfg)
  labels = []
  for f in files:
    lc = readers.load_case(f, rc)
    assert lc.images.shape[-1] == 4 and lc.warnings == []
    raw = np.asarray(nib.load(f.label).dataobj)
    labels.append(set(np.unique(raw).tolist()))
    np.testing.assert_allclose(lc.spacing, 2.0)
  assert labels[0] == {0, 1, 2, 4} and labels[1] == {0, 1, 2, 4}
  assert labels[2] == {0}  # the last subject is lesion-free


@pytest.mark.parametrize('shape,coarse', [((45, 54, 45), 5), ((40, 31, 27), 6), ((91, 109, 91), 12),
                                          ((23, 9, 17), 20)])
def test_smooth_noise_is_the_3d_cubic_zoom_one_axis_at_a_time(shape, coarse):
  """The separable upsampling equals scipy's 3-D order-3 zoom (the reference, from the same draw)
  to one float32 ulp, shape included; the draws themselves are unchanged."""
  rng = np.random.default_rng(7)
  small = rng.standard_normal([max(2, s // coarse) for s in shape]).astype(np.float32)
  want = ndimage.zoom(small, [s / c for s, c in zip(shape, small.shape)], order=3)
  want = want[:shape[0], :shape[1], :shape[2]]
  smooth_noise = phantoms._smooth_noise  # pylint: disable=protected-access
  got = smooth_noise(np.random.default_rng(7), shape, coarse)
  assert got.dtype == np.float32 and got.shape == want.shape == shape
  np.testing.assert_array_max_ulp(got, want, maxulp=1)
  assert np.mean(got != want) < 1e-4
  assert got.std() > 0.1  # a field, not zeros


def test_phantoms_are_seeded():
  cfg = tiny_config()
  anat = phantoms._anatomy()  # pylint: disable=protected-access
  a = phantoms.subject(anat, np.random.default_rng([0, 1]), cfg.data.phantoms, False)
  b = phantoms.subject(anat, np.random.default_rng([0, 1]), cfg.data.phantoms, False)
  np.testing.assert_array_equal(a[0]['flair'], b[0]['flair'])
  c = phantoms.subject(anat, np.random.default_rng([0, 2]), cfg.data.phantoms, False)
  assert not np.array_equal(a[1], c[1])


def test_ct_phantoms_in_hu_through_the_whole_ct_path(tmp_path):
  cfg = ct_phantom_config(2, 1)
  wd = str(tmp_path)
  cases = prepare.run(cfg, wd)
  f = prepare.case_files(cfg, wd)[0]
  ct = np.asarray(nib.load(f.images['ct']).dataobj)
  lab = np.asarray(nib.load(f.label).dataobj) > 0
  assert ct.dtype == np.int16 and ct.min() == -1024
  assert lab.any() and 50 <= np.median(ct[lab]) <= 90  # fresh blood
  brain = ct > -500
  assert 20 <= np.median(ct[brain & ~lab]) <= 45  # grey / white matter
  store = paths.prepared_store(cfg, wd)
  img = np.asarray(store.read(cases[0], 'image'), np.float32)
  assert 0.0 <= img.min() and img.max() <= 1.0  # HU window scaled to [0, 1]
  pseudo_labels.run(cfg, wd)
  reports = pseudo_labels.load_reports(cfg, wd)
  r = reports[cases[0]]
  hu = [cfg.data.ct_window[0] + m[0] * (cfg.data.ct_window[1] - cfg.data.ct_window[0])
        for m in r['means']]
  assert all(50 <= hu[j] <= 90 for j in r['lesion_components'])
  with open(os.path.join(wd, 'pseudo_labels', 'summary.json')) as f:
    dice = {row['case']: row['dice'] for row in json.load(f)['rows']}
  assert dice[cases[0]] > 0.2  # the hard CT case: imperfect by design


def test_brats_label_nests_the_tumour_parts():
  oed = np.array([0.9, 0.9, 0.9, 0.9, 0.2, 0.9])
  act = np.array([0.1, 0.7, 0.8, 0.8, 0.9, 0.9])
  nec = np.array([0.0, 0.1, 0.6, 0.6, 0.0, 0.9])
  brain = np.array([1, 1, 1, 0, 1, 1], bool)
  np.testing.assert_array_equal(phantoms.brats_label(oed, act, nec, brain), [2, 4, 1, 0, 4, 1])


def test_to_spacing_resamples_images_label_and_affine():
  p = ConfigDict({'spacing': (4.0, 4.0, 1.0), 'kind': 'mri'})
  img = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2) + 1
  brain = np.ones((4, 4, 2), bool)
  brain[0] = False
  label = np.zeros((4, 4, 2), np.uint8)
  label[2:, 2:] = 1
  affine = np.diag([2.0, 2.0, 2.0, 1.0])
  affine[:3, 3] = [-10, 5, 3]
  vols, lab, aff = phantoms.to_spacing({'t1': img * brain}, label, affine, brain, p)
  assert vols['t1'].shape == lab.shape == (2, 2, 4) and vols['t1'].dtype == np.float32
  np.testing.assert_array_equal(aff, np.diag([4.0, 4.0, 1.0, 1.0]) + np.pad(
      np.array([[-10.0], [5.0], [3.0]]), ((0, 1), (3, 0))))
  np.testing.assert_array_equal(lab, ndimage.zoom(label, (0.5, 0.5, 2.0), order=0))
  assert (vols['t1'][0] == 0).all()  # outside the (resampled) brain: 0 again
  same = phantoms.to_spacing({'t1': img}, label, affine, brain, ConfigDict({'spacing': (2.0,) * 3,
                                                                          'kind': 'mri'}))
  assert same[0]['t1'] is img and same[1] is label and same[2] is affine


@pytest.mark.slow  # two CT subjects generated
def test_a_ct_rim_changes_only_the_brains_outer_voxels_and_no_label():
  cfg = ct_phantom_config(1, 0)
  anatomy = phantoms._anatomy()  # pylint: disable=protected-access
  plain = phantoms.subject(anatomy, np.random.default_rng([0, 0]), cfg.data.phantoms, False)
  cfg.data.phantoms.ct_rim_hu = 55.0
  rim = phantoms.subject(anatomy, np.random.default_rng([0, 0]), cfg.data.phantoms, False)
  np.testing.assert_array_equal(plain[1], rim[1])  # the same label
  a, b = plain[0]['ct'].astype(np.float32), rim[0]['ct'].astype(np.float32)
  changed = a != b
  brain = a > -1000
  inner = ndimage.binary_erosion(brain)
  assert changed.any() and not (changed & inner).any() and not (changed & ~brain).any()
  # about a fifth of the outermost voxel layer, at the rim's HU give or take the noise
  shell = brain & ~inner
  assert 0.15 < changed.sum() / shell.sum() < 0.25
  assert abs(float(np.median(b[changed])) - 55.0) < 2.0


def test_a_second_workdir_copies_the_phantoms_from_the_cache(tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  monkeypatch.setenv('CGC_JAX_PHANTOM_CACHE', str(cache))
  cfg = tiny_config()
  cfg.data.phantoms.num_subjects, cfg.data.phantoms.lesion_free = 1, 0
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  phantoms.ensure(cfg, a)
  (entry,) = os.listdir(cache)  # one entry, published whole (no temporary folder left)
  assert sorted(os.listdir(cache / entry)) == ['phantom_mri_000', 'phantoms.json']

  def no_generation(*args):
    raise AssertionError(f'generated again: {args[2:]}')
  monkeypatch.setattr(phantoms, 'subject', no_generation)
  phantoms.ensure(cfg, b)
  for name in sorted(os.listdir(os.path.join(a, 'phantom_mri_000'))):
    with open(os.path.join(a, 'phantom_mri_000', name), 'rb') as fa, \
        open(os.path.join(b, 'phantom_mri_000', name), 'rb') as fb:
      assert fa.read() == fb.read(), name  # byte for byte
  # other settings are another entry: generated, not copied
  cfg.data.phantoms.seed += 1
  with pytest.raises(AssertionError, match='generated again'):
    phantoms.ensure(cfg, str(tmp_path / 'c'))
  # the cache off: nothing read or written there
  monkeypatch.setenv('CGC_JAX_PHANTOM_CACHE', 'off')
  with pytest.raises(AssertionError, match='generated again'):
    phantoms.ensure(tiny_config(), str(tmp_path / 'd'))


def test_a_cache_that_cannot_be_written_only_costs_the_generation(tmp_path, monkeypatch):
  blocked = tmp_path / 'file'
  blocked.write_text('a file where the cache folder would be')
  monkeypatch.setenv('CGC_JAX_PHANTOM_CACHE', str(blocked / 'phantoms'))
  cfg = tiny_config()
  cfg.data.phantoms.num_subjects, cfg.data.phantoms.lesion_free = 1, 0
  root = phantoms.ensure(cfg, str(tmp_path / 'a'))
  assert os.path.exists(os.path.join(root, 'phantoms.json'))
  assert sorted(os.listdir(os.path.join(root, 'phantom_mri_000')))
