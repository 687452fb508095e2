"""One DICOM series (a folder of single-frame image files) as the volume a NIfTI file would give:
voxels in the scanner's units after each slice's rescale (Hounsfield units for CT), and the RAS
affine from the headers, so that the rest of the pipeline cannot tell the two apart.

Read with pydicom (pure Python, the reference DICOM parser; no converter binary to install).
Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the
cross product of ImageOrientationPatient's two directions), not by file name or InstanceNumber; the
affine's third column is the slices' mean displacement (exact for a tilted gantry's sheared grid).
A folder is refused, with every problem named (nifti.Problem, so `verify` lists them like the
NIfTI ones), when it holds: files that are not DICOM, DICOM objects without pixels (reports,
presentation states), more than one series (each SeriesInstanceUID named), enhanced multi-frame
objects, slices of different orientation or size, missing slices (a gap over 1.5x the series'
spacing) or an inconsistent slice spacing (over 1% from the median).

Voxel (i, j, k): i along a row (column index), j down the columns (row index), k along the normal.
"""
import os
from typing import Optional

import nibabel as nib
import numpy as np

from cgc_jax.imaging.nifti import Problem

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: str) -> bool:
  """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
  try:
    with open(path, 'rb') as f:
      return f.read(132)[128:] == b'DICM'
  except OSError:
    return False


def is_series_folder(path: str) -> bool:
  """A folder whose files include DICOM files (the first few are looked at)."""
  if not os.path.isdir(path):
    return False
  names = sorted(n for n in os.listdir(path) if not n.startswith('.'))
  return any(is_dicom_file(os.path.join(path, n)) for n in names[:8])


def series_files(path: str) -> list:
  """The files of a series folder (sorted; hidden files left out): the case's input identity."""
  return [os.path.join(path, n) for n in sorted(os.listdir(path))
          if not n.startswith('.') and os.path.isfile(os.path.join(path, n))]


def series_folders(root: str) -> list:
  """Every folder under `root` (itself included) that holds DICOM files, sorted."""
  return sorted(d for d, _, _ in os.walk(root) if is_series_folder(d))


_NOT_PLAIN = ('BONE', 'LUNG', 'POST', 'CONTRAST', 'C+', 'CTA', 'ANGIO', 'SCOUT', 'LOCALIZER',
              'TOPO', 'MIP', 'DOSE')


def choose_ct_series(case_dir: str) -> tuple:
  """The CT series of a study folder holding several (CQ500: 'CT PLAIN THIN', 'CT Plain',
  'CT BONE', 'CT 0.625mm', ...) -> (folder or None, why, [(folder, description, slices,
  thickness mm, kept)]).

  The rule: a CT series of axial slices (normal within 10 degrees of the head's axis) whose
  description names no other reconstruction or scan (bone or lung kernel, post-contrast,
  angiography, scout, MIP, dose report) and that has at least 10 slices; of those, the thinnest
  slices, then the most slices. A plain soft-tissue head CT in the thinnest slices is what the
  mixture's HU ranges were set on."""
  import pydicom  # pylint: disable=g-import-not-at-top
  found = []
  for d in series_folders(case_dir):
    files = [f for f in series_files(d) if is_dicom_file(f)]
    try:
      ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception:  # pylint: disable=broad-except  (load_series reports it if chosen)
      continue
    desc = str(ds.get('SeriesDescription', ''))
    thick = float(ds.get('SliceThickness', 0) or 0) or float('inf')
    o = np.asarray(ds.get('ImageOrientationPatient', [1, 0, 0, 0, 1, 0]), np.float64)
    axial = abs(np.cross(o[:3], o[3:])[2]) > np.cos(np.radians(10))
    plain = not any(w in desc.upper() for w in _NOT_PLAIN)
    kept = str(ds.get('Modality', '')) == 'CT' and axial and plain and len(files) >= 10
    found.append((d, desc, len(files), thick, kept))
  kept = [f for f in found if f[4]]
  if not kept:
    return None, 'no plain axial CT series of 10 or more slices', found
  best = min(kept, key=lambda f: (f[3], -f[2], f[0]))
  return best[0], (f'the thinnest plain axial CT series ({best[3]:g} mm, {best[2]} slices) of '
                   f'{len(found)}'), found


def header(affine: np.ndarray) -> nib.Nifti1Header:
  """A NIfTI header saying the affine is the scanner's (qform and sform code 1), written back with
  the masks of a DICOM case."""
  img = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  return img.header


def load_series(path: str, problems: list) -> Optional[tuple]:
  """A series folder -> (f32[X, Y, Z] in the scanner's units, RAS affine f64[4, 4], spacing f64[3],
  NIfTI header), as nifti.load_volume gives for a file; None with `problems` appended when the
  folder is not one readable series."""
  out = _read_series(path, problems)
  return None if out is None else out[:4]


def ordered_slices(path: str) -> list:
  """The series' datasets in the order of the volume's k axis (load_series' order)."""
  problems = []
  out = _read_series(path, problems, pixels=False)
  if out is None:
    raise ValueError('; '.join(str(p) for p in problems))
  return out[4]


def write_seg(mask: np.ndarray, series_dir: str, path: str, version: str = ''):
  """mask u8[X, Y, Z] on the grid load_series(series_dir) gives -> a binary DICOM-SEG at `path`
  (highdicom), one frame per source slice, referencing the source series, one segment 'lesion'
  (SCT Morphologically Abnormal Structure / Lesion), written atomically."""
  import highdicom as hd  # pylint: disable=g-import-not-at-top  (only DICOM output needs it)
  from pydicom.sr.codedict import codes  # pylint: disable=g-import-not-at-top
  sources = ordered_slices(series_dir)
  frames = np.stack([np.asarray(mask[:, :, k]).T for k in range(mask.shape[2])]).astype(np.uint8)
  algorithm = hd.AlgorithmIdentificationSequence(
      name='cgc_jax', version=version or '0', family=codes.cid7162.ArtificialIntelligence)
  segment = hd.seg.SegmentDescription(
      segment_number=1, segment_label='lesion',
      segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
      segmented_property_type=codes.SCT.Lesion,
      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
      algorithm_identification=algorithm)
  seg = hd.seg.Segmentation(
      source_images=sources, pixel_array=frames,
      segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
      series_instance_uid=hd.UID(), series_number=9001, sop_instance_uid=hd.UID(),
      instance_number=1, manufacturer='cgc_jax', manufacturer_model_name='cgc_jax lesion '
      'segmentation', software_versions=version or '0', device_serial_number='0',
      omit_empty_frames=False)
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    seg.save_as(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _read_series(path: str, problems: list, pixels: bool = True) -> Optional[tuple]:
  """load_series' work -> (data, affine, spacing, header, datasets in k order) or None; with
  pixels=False the headers only (data None: nothing decoded)."""
  import pydicom  # pylint: disable=g-import-not-at-top  (only DICOM cases need it)
  start = len(problems)
  slices, series = [], {}
  for f in series_files(path):
    if not is_dicom_file(f):
      problems.append(Problem(f, 'not a DICOM file, in a DICOM series folder'))
      continue
    try:
      ds = pydicom.dcmread(f)
    except Exception as e:  # pydicom raises many types for damaged files
      problems.append(Problem(f, f'unreadable DICOM file ({type(e).__name__}: {e})'))
      continue
    if 'PixelData' not in ds:
      problems.append(Problem(f, f'a DICOM object without pixels ({ds.get("Modality", "?")}, '
                              f'SOP class {ds.get("SOPClassUID", "?")}) in a series folder'))
      continue
    if int(ds.get('NumberOfFrames', 1) or 1) > 1:
      problems.append(Problem(f, 'an enhanced multi-frame DICOM object: not read here (convert '
                              'the series with dcm2niix)'))
      continue
    series.setdefault(str(ds.get('SeriesInstanceUID', '?')), []).append(f)
    slices.append((f, ds))
  if len(series) > 1:
    listed = '; '.join(f'{uid} ({len(fs)} files, e.g. {os.path.basename(fs[0])})'
                       for uid, fs in sorted(series.items()))
    problems.append(Problem(path, f'{len(series)} DICOM series in one folder: {listed}; keep one '
                            'series per modality folder'))
  if not slices and len(problems) == start:
    problems.append(Problem(path, 'no DICOM image files in the series folder'))
  if len(problems) > start:
    return None
  try:
    orient = [np.asarray(ds.ImageOrientationPatient, np.float64) for _, ds in slices]
    pos = [np.asarray(ds.ImagePositionPatient, np.float64) for _, ds in slices]
    pixel = [np.asarray(ds.PixelSpacing, np.float64) for _, ds in slices]
  except AttributeError as e:
    problems.append(Problem(path, f'a slice lacks its position, orientation or pixel spacing '
                            f'({e})'))
    return None
  if any(np.abs(o - orient[0]).max() > 1e-4 for o in orient) or \
      any(np.abs(p - pixel[0]).max() > 1e-4 for p in pixel):
    problems.append(Problem(path, 'slices of different orientation or pixel spacing in one series'))
    return None
  row, col = orient[0][:3], orient[0][3:]
  normal = np.cross(row, col)
  along = np.asarray([float(p @ normal) for p in pos])
  order = np.argsort(along)
  along = along[order]
  slices = [slices[i] for i in order]
  shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
  if len(shapes) > 1:
    problems.append(Problem(path, f'slices of different sizes in one series: {sorted(shapes)}'))
    return None
  if len(slices) > 1:
    gaps = np.diff(along)
    step = float(np.median(gaps))
    if step < 1e-6:
      problems.append(Problem(path, 'two or more slices at the same position (a duplicated slice, '
                              'or several series mixed under one SeriesInstanceUID)'))
      return None
    big = np.nonzero(gaps > 1.5 * step)[0]
    if big.size:
      i = int(big[0])
      problems.append(Problem(path, f'missing slices: a gap of {gaps[i]:.2f} mm between '
                              f'{os.path.basename(slices[i][0])} and '
                              f'{os.path.basename(slices[i + 1][0])} (slice spacing {step:.2f} '
                              'mm)'))
      return None
    if np.abs(gaps - step).max() > 0.01 * step:
      problems.append(Problem(path, f'inconsistent slice spacing: {gaps.min():.3f} to '
                              f'{gaps.max():.3f} mm'))
      return None
  else:
    step = float(slices[0][1].get('SliceThickness', 1.0) or 1.0)
  if not pixels:
    return None, None, None, None, [ds for _, ds in slices]
  try:
    planes = []
    for f, ds in slices:
      a = ds.pixel_array.astype(np.float32)
      slope = float(ds.get('RescaleSlope', 1.0) or 1.0)
      intercept = float(ds.get('RescaleIntercept', 0.0) or 0.0)
      planes.append((a * slope + intercept).T)  # (rows, columns) -> (i along a row, j)
  except Exception as e:  # compressed transfer syntaxes without a decoder, truncated pixels
    problems.append(Problem(f, f'pixels not readable ({type(e).__name__}: {e})'))
    return None
  data = np.stack(planes, axis=-1)
  dr, dc = pixel[0]  # PixelSpacing: between rows, between columns
  lps = np.eye(4)
  lps[:3, 0] = row * dc
  lps[:3, 1] = col * dr
  # the slices' own displacement (a tilted gantry's sheared grid included), not the normal alone
  lps[:3, 2] = ((pos[order[-1]] - pos[order[0]]) / (len(slices) - 1) if len(slices) > 1 else
                normal * step)
  lps[:3, 3] = pos[order[0]]
  affine = _LPS_TO_RAS @ lps
  spacing = np.asarray([dc, dr, np.linalg.norm(lps[:3, 2])], np.float64)
  return data, affine, spacing, header(affine), [ds for _, ds in slices]
