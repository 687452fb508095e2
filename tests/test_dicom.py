"""DICOM series in: a folder of slices read as the NIfTI file of the same scan would be (values
after rescale, RAS affine from the headers), bad series refused with every problem named, and a
case of DICOM series predicted with the same masks as its NIfTI copy."""
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom import uid as uids

from cgc_jax import errors
from cgc_jax.imaging import dicom
from cgc_jax.stages import prepare

from conftest import tiny_config

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(volume, affine, folder, modality='CT', slope=0.5, intercept=-1024.0,
                 series_uid=None, reverse=True, description=''):
  """Writes f[X, Y, Z] with RAS `affine` as one DICOM series (one file per k, uint16 pixels stored
  as (value - intercept) / slope), files numbered from the last slice to the first (reverse)."""
  os.makedirs(folder, exist_ok=True)
  lps = _LPS @ np.asarray(affine, np.float64)
  dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
  series_uid = series_uid or uids.generate_uid()
  stored = np.rint((np.asarray(volume, np.float64) - intercept) / slope)
  assert stored.min() >= 0 and stored.max() < 65536
  nz = volume.shape[2]
  for k in range(nz):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uids.CTImageStorage if modality == 'CT' else \
        uids.MRImageStorage
    meta.MediaStorageSOPInstanceUID = uids.generate_uid()
    meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, \
        meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, '1.2.3.4'
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = 'P1', 'Phantom^One', '', 'O'
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = '1', '20261203', '120000', ''
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.FrameOfReferenceUID = '', 1, '1.2.3.4.5'
    ds.InstanceNumber = nz - k if reverse else k + 1
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
    ds.PixelSpacing = [f'{dr:.10g}', f'{dc:.10g}']
    ds.ImageOrientationPatient = [f'{v:.10g}' for v in np.concatenate(
        [lps[:3, 0] / dc, lps[:3, 1] / dr])]
    ds.ImagePositionPatient = [f'{v:.10g}' for v in (lps @ [0, 0, k, 1])[:3]]
    ds.SliceThickness = f'{np.linalg.norm(lps[:3, 2]):.10g}'
    ds.RescaleSlope, ds.RescaleIntercept = f'{slope:g}', f'{intercept:g}'
    ds.SeriesDescription = description
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = stored[:, :, k].T.astype(np.uint16).tobytes()  # rows = j, columns = i
    ds.save_as(os.path.join(folder, f'IM{ds.InstanceNumber:04d}.dcm'), enforce_file_format=True)


def _ct_volume():
  rng = np.random.default_rng(0)
  hu = rng.integers(-1024, 1500, size=(12, 10, 7)).astype(np.float32)
  affine = np.array([[-0.9, 0.0, 0.0, 60.0], [0.0, 0.8, 0.1, -40.5], [0.0, -0.05, 2.5, 10.0],
                     [0.0, 0.0, 0.0, 1.0]])
  return hu, affine


def test_a_ct_series_reads_back_in_hu_with_its_affine(tmp_path):
  hu, affine = _ct_volume()
  write_series(hu, affine, str(tmp_path / 'ct'))
  assert dicom.is_series_folder(str(tmp_path / 'ct'))
  problems = []
  data, aff, spacing, header = dicom.load_series(str(tmp_path / 'ct'), problems)
  assert problems == []
  # this affine's slice axis runs against the slices' normal: the reader orders the slices along
  # the normal, so its grid is the NIfTI's with k reversed; the same voxels in the same places
  assert aff[2, 2] < 0
  want = nib.as_closest_canonical(nib.Nifti1Image(hu, affine))
  got = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
  np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))  # HU
  np.testing.assert_allclose(got.affine, want.affine, atol=1e-6)
  np.testing.assert_allclose(spacing, np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-6)
  assert int(header['qform_code']) == 1 and int(header['sform_code']) == 1


def test_bad_series_are_refused_naming_each_problem(tmp_path):
  hu, affine = _ct_volume()
  two = str(tmp_path / 'two')
  write_series(hu, affine, two, series_uid='1.2.3.100')
  write_series(hu, affine, str(tmp_path / 'other'), series_uid='1.2.3.200')
  for f in sorted(os.listdir(tmp_path / 'other'))[:3]:
    shutil.copy(tmp_path / 'other' / f, os.path.join(two, 'B' + f))
  problems = []
  assert dicom.load_series(two, problems) is None
  assert len(problems) == 1 and '2 DICOM series in one folder' in problems[0].message
  assert '1.2.3.100 (7 files' in problems[0].message and '1.2.3.200 (3 files' in problems[0].message
  gap = str(tmp_path / 'gap')
  write_series(hu, affine, gap)
  os.remove(os.path.join(gap, 'IM0004.dcm'))
  problems = []
  assert dicom.load_series(gap, problems) is None
  assert 'missing slices: a gap of 5.00 mm' in problems[0].message
  junk = str(tmp_path / 'junk')
  write_series(hu, affine, junk)
  with open(os.path.join(junk, 'notes.txt'), 'w') as f:
    f.write('not a slice')
  problems = []
  assert dicom.load_series(junk, problems) is None
  assert problems[0].path.endswith('notes.txt') and 'not a DICOM file' in problems[0].message


def test_a_cq500_study_folder_reads_its_thinnest_plain_axial_ct_series(tmp_path):
  """A CQ500-style study (several series of one head CT): the bone-kernel and the too-short series
  are passed over, the thinnest plain axial one is read; the discovery says which and why."""
  import cq500  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  hu = rng.integers(-1024, 1500, size=(12, 10, 12)).astype(np.float32)
  study = tmp_path / 'root' / 'CQ500-CT-7' / 'Unknown Study'
  thin = np.diag([0.5, 0.5, 0.625, 1.0])
  write_series(hu, thin, str(study / 'CT BONE'), description='CT BONE')
  write_series(hu, np.diag([0.5, 0.5, 5.0, 1.0]), str(study / 'CT Plain'), description='CT Plain')
  write_series(hu, np.diag([0.5, 0.5, 0.8, 1.0]), str(study / 'CT PLAIN THIN'),
               description='CT PLAIN THIN')
  write_series(hu[..., :5], thin, str(study / 'CT 4cm'), description='CT 4cm')  # 5 slices
  chosen, why, found = dicom.choose_ct_series(str(tmp_path / 'root' / 'CQ500-CT-7'))
  assert chosen == str(study / 'CT PLAIN THIN')
  assert why == 'the thinnest plain axial CT series (0.8 mm, 12 slices) of 4'
  assert sorted(os.path.basename(f[0]) for f in found if not f[4]) == ['CT 4cm', 'CT BONE']
  cfg = cq500.get_config()
  files = prepare.case_files(cfg, '', str(tmp_path / 'root'))
  assert [(f.case_id, f.images['ct'], f.missing) for f in files] == [
      ('CQ500-CT-7', str(study / 'CT PLAIN THIN'), [])]


@pytest.mark.slow
def test_a_case_of_dicom_series_predicts_the_masks_of_its_nifti_copy(tiny_trained, tmp_path):
  """The tiny phantoms' four MRI modalities as DICOM series (LPS, files from the last slice to the
  first, slope 0.05): predict gives the NIfTI copy's mask, voxel for voxel on the
  same grid with the same affine; a case folder with two series in one modality stops with exit
  2's StageError naming both."""
  from cgc_jax import pipeline  # pylint: disable=g-import-not-at-top
  wd = tiny_trained
  cfg = pipeline.workdir_config(wd)
  case = sorted(c for c in os.listdir(os.path.join(wd, 'phantoms')) if c.startswith('phantom_'))[0]
  src = os.path.join(wd, 'phantoms', case)
  nifti_case, dicom_case = tmp_path / 'nii' / case, tmp_path / 'dcm' / case
  os.makedirs(nifti_case)
  for m in cfg.data.modalities:
    img = nib.load(os.path.join(src, f'{case}_{m}.nii.gz'))
    v = np.asarray(img.dataobj, np.float64)
    stored = np.rint(v / 0.05)
    values = stored.astype(np.float32) * 0.05 + 0.0  # what the reader computes
    write_series(values, img.affine, str(dicom_case / m), modality='MR', slope=0.05,
                 intercept=0.0)
    nib.save(nib.Nifti1Image(values, img.affine), str(nifti_case / f'{case}_{m}.nii.gz'))
  out = {}
  run = str(tmp_path / 'run')  # the trained workdir's copy (predict prepares the scans in it)
  shutil.copytree(wd, run, ignore=shutil.ignore_patterns('phantoms', 'predict', '.lock'))
  for name, root in (('nii', tmp_path / 'nii'), ('dcm', tmp_path / 'dcm')):
    c = pipeline.with_predict_paths(cfg, str(root), str(tmp_path / f'out_{name}'))
    c.eval.output_format = 'dicom_seg'  # a DICOM-SEG for the DICOM case only
    pipeline.run(c, run, 'predict')
    out[name] = nib.load(str(tmp_path / f'out_{name}' / f'{case}.nii.gz'))
  np.testing.assert_allclose(out['dcm'].affine, out['nii'].affine, atol=1e-5)
  a, b = np.asarray(out['nii'].dataobj), np.asarray(out['dcm'].dataobj)
  assert a.any()
  np.testing.assert_array_equal(b, a)
  assert not os.path.exists(tmp_path / 'out_nii' / f'{case}.dcm')
  # the DICOM-SEG: references the FLAIR series; its frames, by source slice, are the mask's
  import highdicom as hd  # pylint: disable=g-import-not-at-top
  seg = hd.seg.segread(str(tmp_path / 'out_dcm' / f'{case}.dcm'))
  flair = dicom.ordered_slices(str(dicom_case / 'flair'))
  refs = [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence]
  assert refs == [flair[0].SeriesInstanceUID]
  frames = seg.get_pixels_by_source_instance(
      source_sop_instance_uids=[ds.SOPInstanceUID for ds in flair], segment_numbers=[1])
  rebuilt = np.stack([f[..., 0].T for f in frames], axis=-1)
  np.testing.assert_array_equal(rebuilt, b)
  # two series in the FLAIR folder: the case is refused, naming the folder and both series
  write_series(values, img.affine, str(tmp_path / 'extra'), modality='MR', slope=0.05,
               intercept=0.0, series_uid='9.9.9')
  shutil.copy(tmp_path / 'extra' / 'IM0001.dcm', dicom_case / 'flair' / 'X.dcm')
  with pytest.raises(errors.StageError, match=r'flair: 2 DICOM series in one folder.*9\.9\.9'):
    prepare.verify(tiny_config(), str(tmp_path / 'v'), str(tmp_path / 'dcm'))
