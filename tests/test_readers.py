"""Readers and verification: every problem named with its file, nothing written."""
import gzip
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
from ml_collections import ConfigDict
import pytest

from cgc_jax.core import paths
from cgc_jax.imaging import readers
from cgc_jax.stages import prepare

from conftest import ROOT


def _save(arr, path, affine=None):
  nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), path)


def _good_case(root, name, shape=(20, 22, 18), seed=0):
  rng = np.random.default_rng(seed)
  d = os.path.join(root, name)
  os.makedirs(d)
  brain = np.zeros(shape, bool)
  brain[3:-3, 3:-3, 3:-3] = True
  for m in ('FLAIR', 'T1'):
    _save(
        np.where(brain,
                 rng.random(shape) + 1, 0).astype(np.float32), os.path.join(d, f'{m}.nii.gz'))
  lab = np.zeros(shape, np.uint8)
  lab[8:12, 8:12, 8:12] = 1
  _save(lab, os.path.join(d, 'GT_W.nii.gz'))
  return d


def folder_config(root):
  import brats_sample  # pylint: disable=g-import-not-at-top
  c = brats_sample.get_config()
  c.data.root = str(root)
  c.data.num_workers = 1
  c.data.target_spacing = ()
  return c


def _broken_dataset(root):
  """One good case and one case per problem; returns {problem keyword: file}."""
  _good_case(root, 'good')
  expect = {}
  d = _good_case(root, 'missing')
  os.remove(os.path.join(d, 'T1.nii.gz'))
  expect['missing file'] = os.path.join(d, 'T1.nii.gz')
  d = _good_case(root, 'shape')
  _save(np.ones((20, 22, 17), np.float32), os.path.join(d, 'T1.nii.gz'))
  expect['differs from'] = os.path.join(d, 'T1.nii.gz')
  d = _good_case(root, 'nan')
  v = nib.load(os.path.join(d, 'FLAIR.nii.gz')).get_fdata().astype(np.float32)
  v[5, 5, 5:8] = np.nan
  _save(v, os.path.join(d, 'FLAIR.nii.gz'))
  expect['3 NaN or Inf'] = os.path.join(d, 'FLAIR.nii.gz')
  d = _good_case(root, 'truncated')
  p = os.path.join(d, 'FLAIR.nii.gz')
  raw = open(p, 'rb').read()
  open(p, 'wb').write(raw[:len(raw) // 2])
  expect['truncated or damaged gzip stream'] = p
  d = _good_case(root, 'constant')
  _save(np.full((20, 22, 18), 7.0, np.float32), os.path.join(d, 'T1.nii.gz'))
  expect['constant image'] = os.path.join(d, 'T1.nii.gz')
  d = _good_case(root, 'label3')  # a bad label: a warning, the case is prepared unscored
  lab = np.zeros((20, 22, 18), np.uint8)
  lab[5, 5, 5] = 3
  _save(lab, os.path.join(d, 'GT_W.nii.gz'))
  d = _good_case(root, 'fourd')
  _save(np.ones((20, 22, 18, 2), np.float32), os.path.join(d, 'FLAIR.nii.gz'))
  expect['expected a 3D volume'] = os.path.join(d, 'FLAIR.nii.gz')
  return expect


def test_verify_names_every_problem_and_writes_nothing(tmp_path):
  data = tmp_path / 'data'
  expect = _broken_dataset(str(data))
  wd = tmp_path / 'wd'
  with pytest.raises(prepare.StageError) as e:
    prepare.verify(folder_config(data), str(wd))
  msg = str(e.value)
  for keyword, path in expect.items():
    assert any(keyword in line and path in line for line in msg.splitlines()), (keyword, msg)
  assert '6 of 8 cases failed' in msg and 'label3' not in msg
  assert not wd.exists()


def test_main_verify_exit_code_and_no_traceback(tmp_path):
  data = tmp_path / 'data'
  _broken_dataset(str(data))
  wd = tmp_path / 'wd'
  r = subprocess.run([sys.executable, '-m', 'cgc_jax.main', '--config=configs/brats_sample.py',
                      f'--config.data.root={data}', f'--workdir={wd}', '--mode=verify',
                      '--config.data.num_workers=2'], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  assert 'constant image' in r.stderr and 'truncated' in r.stderr
  assert not wd.exists()


def test_prepare_keeps_good_cases_and_writes_nothing_for_bad(tmp_path, caplog):
  data = tmp_path / 'data'
  _broken_dataset(str(data))
  wd = tmp_path / 'wd'
  c = folder_config(data)
  with pytest.raises(prepare.StageError):
    prepare.run(c, str(wd))
  assert sorted(os.listdir(wd / 'prepared' / 'cases')) == ['good', 'label3']
  store = paths.prepared_store(c, str(wd))
  assert store.complete_cases() == ['good', 'label3']
  # the bad label is a warning naming it; the case is prepared all the same (segmented, not
  # scored): its image shard never holds a label, and it has no reference
  meta = store.meta('label3')
  assert 'label' not in meta['arrays'] and meta['warnings'] == []
  refs = paths.reference_store(c, str(wd))
  assert refs.complete_cases() == ['good'] and not refs.is_complete('label3')
  label = str(data / 'label3' / 'GT_W.nii.gz')
  assert f'label3: WARNING: {label}: label values [3.0] not in the allowed set [0, 1] (the label ' \
      'is skipped: this case is not scored)' in caplog.text


def test_brats_layout_hgg_lgg_and_flat(tmp_path):
  for sub, case in [('HGG', 'Brats18_A_1'), ('LGG', 'Brats18_B_1'), ('', 'Brats18_C_1')]:
    d = tmp_path / sub / case
    d.mkdir(parents=True)
    for m in ('t1', 't1ce', 't2', 'flair'):
      _save(np.ones((4, 4, 4), np.float32), str(d / f'{case}_{m}.nii.gz'))
    _save(np.zeros((4, 4, 4), np.uint8), str(d / f'{case}_seg.nii.gz'))
  import brats  # pylint: disable=g-import-not-at-top
  c = brats.get_config()
  c.data.root = str(tmp_path)
  c.data.modalities = ('flair', 't1')  # any subset
  cases = readers.discover(c.data)
  assert [x.case_id for x in cases] == ['Brats18_A_1', 'Brats18_B_1', 'Brats18_C_1']
  assert cases[0].images['flair'].endswith('HGG/Brats18_A_1/Brats18_A_1_flair.nii.gz')
  assert all(x.label and not x.missing for x in cases)


def test_ct_warnings_and_approximate_mask(tmp_path):
  d = tmp_path / 'c1'
  d.mkdir()
  shape = (30, 30, 20)
  g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1)
  head = np.sqrt((((g - [15, 15, 10]) / [12, 12, 8]) ** 2).sum(-1)) < 1
  ct = np.where(head, 35.0, -1000.0).astype(np.float32)
  ct[np.sqrt((((g - [15, 15, 10]) / [13, 13, 9]) ** 2).sum(-1)) < 1 & ~head] = 900  # skull
  _save(ct, str(d / 'c1_ct.nii.gz'))
  import cq500  # pylint: disable=g-import-not-at-top
  c = cq500.get_config()
  c.data.root = str(tmp_path)
  c.data.ct_brain_extracted = False
  files = readers.discover(c.data)
  lc = readers.load_case(files[0], c.data)
  assert lc.warnings == []
  from cgc_jax.imaging import geometry  # pylint: disable=g-import-not-at-top
  brain, approx = geometry.brain_mask(lc.images, c.data)
  assert approx and abs(int(brain.sum()) - int(head.sum())) < 0.1 * head.sum()
  # intensities that are not HU (e.g. 0..255 PNG-like export) draw a warning
  _save((ct > 0).astype(np.float32) * 200 + 1, str(d / 'c1_ct.nii.gz'))
  lc = readers.load_case(readers.discover(c.data)[0], c.data)
  assert any('Hounsfield' in w.message for w in lc.warnings)


def test_gz_magic_only_is_an_error(tmp_path):
  d = tmp_path / 'x'
  d.mkdir()
  with gzip.open(d / 'FLAIR.nii.gz', 'wb') as f:
    f.write(b'not a nifti header')
  _save(np.ones((4, 4, 4), np.float32), str(d / 'T1.nii.gz'))
  c = folder_config(tmp_path)
  with pytest.raises(readers.DataError, match='not a readable NIfTI'):
    readers.load_case(readers.discover(c.data)[0], c.data)


def test_header_without_spatial_information_is_named_and_geometry_comes_from_another_channel(
    tmp_path):
  d = _good_case(tmp_path, 'c')
  aff = np.diag([1.5, 1.5, 3.0, 1.0])
  aff[:3, 3] = (10.0, -20.0, 5.0)
  for m in ('T1', 'GT_W'):  # T1 and the label carry the real geometry
    img = nib.load(os.path.join(d, f'{m}.nii.gz'))
    _save(np.asarray(img.dataobj), os.path.join(d, f'{m}.nii.gz'), aff)
  flair = nib.load(os.path.join(d, 'FLAIR.nii.gz'))
  bare = nib.Nifti1Image(np.asarray(flair.dataobj), None)  # the reference channel: no geometry
  bare.header.set_qform(None, code=0)
  bare.header.set_sform(None, code=0)
  bare.header['pixdim'][1:4] = 0
  nib.save(bare, os.path.join(d, 'FLAIR.nii.gz'))
  c = folder_config(tmp_path)
  lc = readers.load_case(readers.discover(c.data)[0], c.data)
  np.testing.assert_allclose(lc.affine, aff)
  np.testing.assert_allclose(lc.spacing, (1.5, 1.5, 3.0))
  msgs = [str(w) for w in lc.warnings]
  assert len(msgs) == 1, msgs
  assert 'FLAIR.nii.gz' in msgs[0] and 'no spatial information' in msgs[0]
  assert 'T1.nii.gz' in msgs[0]  # where the geometry came from


def test_nnunet_raw_layout_channels_by_index(tmp_path):
  c = folder_config(tmp_path)
  c.data.modalities = ('flair', 't1')
  for split in ('imagesTr', 'imagesTs'):
    os.makedirs(tmp_path / split)
  os.makedirs(tmp_path / 'labelsTr')
  rng = np.random.default_rng(0)
  for case, split in (('BRATS_001', 'imagesTr'), ('BRATS_002', 'imagesTs')):
    for ch in range(2):
      _save(
          rng.random((6, 6, 6)).astype(np.float32) + 1,
          str(tmp_path / split / f'{case}_{ch:04d}.nii.gz'))
  _save(np.zeros((6, 6, 6), np.uint8), str(tmp_path / 'labelsTr' / 'BRATS_001.nii.gz'))
  os.remove(tmp_path / 'imagesTs' / 'BRATS_002_0001.nii.gz')
  cases = readers.discover(c.data)
  assert [f.case_id for f in cases] == ['BRATS_001', 'BRATS_002']
  a, b = cases
  assert a.images == {'flair': str(tmp_path / 'imagesTr' / 'BRATS_001_0000.nii.gz'),
                      't1': str(tmp_path / 'imagesTr' / 'BRATS_001_0001.nii.gz')}
  assert a.label == str(tmp_path / 'labelsTr' / 'BRATS_001.nii.gz') and not a.missing
  assert b.label is None and b.missing == [str(tmp_path / 'imagesTs' / 'BRATS_002_0001.nii.gz')]
  # a bare folder of CASE_XXXX files (e.g. only the test images)
  bare = readers.discover(c.data, str(tmp_path / 'imagesTr'))
  assert [f.case_id for f in bare] == ['BRATS_001'] and bare[0].label is None


def test_a_case_folder_or_a_single_file_as_the_root(tmp_path):
  d = _good_case(tmp_path, 'only')
  c = folder_config(tmp_path)
  cases = readers.discover(c.data, d)  # the case folder itself
  assert [f.case_id for f in cases] == ['only'
                                       ] and cases[0].images['flair'].endswith('FLAIR.nii.gz')
  with pytest.raises(readers.DataError, match='give the case folder'):
    readers.discover(c.data, os.path.join(d, 'FLAIR.nii.gz'))
  c.data.modalities = ('ct',)
  c.data.kind = 'ct'
  one = readers.discover(c.data, os.path.join(d, 'T1.nii.gz'))
  assert [(f.case_id, f.images, f.label) for f in one] == [
      ('T1', {'ct': os.path.join(d, 'T1.nii.gz')}, None)]


def _cfg(**kw):
  c = ConfigDict({'affine_tolerance': 1e-3, 'strict_geometry': False, 'kind': 'mri',
                  'ct_background_below': -500.0})
  c.update(kw)
  return c


def test_geometry_problems_one_rule_each():
  hdr = nib.Nifti1Header()
  hdr.set_qform(np.eye(4), code=1)
  bare = nib.Nifti1Header()  # qform and sform codes 0
  ref = (np.zeros((4, 4, 4)), np.eye(4), np.ones(3), hdr)

  def probs(vol, **kw):
    return [(p.severity, p.message) for p in readers.geometry_problems('x.nii', vol, 'r.nii', ref,
                                                                       True, _cfg(**kw))]
  assert probs(ref) == []
  assert probs((np.zeros((4, 4, 5)),) + ref[1:]) == [
      ('error', 'shape (4, 4, 5) differs from (4, 4, 4) of r.nii')]
  assert probs(ref[:3] + (bare,))[0][0] == 'warning'
  assert 'taken from r.nii' in probs(ref[:3] + (bare,))[0][1]
  assert probs((ref[0], ref[1], np.array([1.0, 1.0, 1.5]), hdr)) == [
      ('error', 'voxel spacing [1.0, 1.0, 1.5] differs from [1.0, 1.0, 1.0] of r.nii')]
  shifted = np.eye(4)
  shifted[0, 3] = 0.01  # beyond the 1e-3 tolerance
  assert probs((ref[0], shifted, ref[2], hdr)) == [
      ('warning', 'affine differs from that of r.nii')]
  assert probs((ref[0], shifted, ref[2], hdr), strict_geometry=True)[0][0] == 'error'
  shifted[0, 3] = 5e-4  # within it
  assert probs((ref[0], shifted, ref[2], hdr)) == []


def test_intensity_and_label_problems_one_rule_each():
  def probs(data, **kw):
    return [(p.severity, p.message) for p in readers.intensity_problems('x.nii', data, _cfg(**kw))]
  img = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
  assert probs(img) == []
  bad = img.copy()
  bad[0, 0, 0], bad[1, 1, 1] = np.nan, np.inf
  assert probs(bad) == [('error', '2 NaN or Inf voxels')]
  assert probs(np.full((2, 2, 2), 3.0))[0][0] == 'error'
  ct = np.array([-1024.0, -1024.0, 20.0, 30.0, 40.0])
  assert probs(ct, kind='ct') == []
  assert probs(ct + 1024.0, kind='ct')[0][0] == 'warning'  # no negative values: not HU
  assert 'median of non-background 400' in probs(ct * 10 + 100.0, kind='ct')[0][1]
  lab = np.array([0.0, 1.0, 2.0, 4.0, 3.0, 7.0])
  assert [p.message for p in readers.label_problems('l.nii', lab, (0, 1, 2, 4))] == [
      'label values [3.0, 7.0] not in the allowed set [0, 1, 2, 4]']
  assert readers.label_problems('l.nii', lab[:4], (0, 1, 2, 4)) == []
  assert 'NaN or Inf' in readers.label_problems('l.nii', np.array([np.nan, 1.0]), (0, 1))[0].message
