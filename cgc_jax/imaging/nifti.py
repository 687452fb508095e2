"""NIfTI in and out: every volume cgc_jax reads (with the checks that name the file) and every mask
or probability map it writes (on the scan's original grid, with its affine).
"""
import dataclasses
import gzip
import os
import zlib

import nibabel as nib
import numpy as np


@dataclasses.dataclass
class Problem:
  """One problem found in one file; severity 'error' stops the case, 'warning' is logged."""
  path: str
  message: str
  severity: str = 'error'

  def __str__(self):
    return f'{self.severity.upper()}: {self.path}: {self.message}'



def open_nifti(path: str):
  """nib.load, except that a .gz file is decompressed whole first, so that a truncated stream or a
  CRC mismatch is an error even when the voxel data happen to be complete (nibabel stops reading at
  the last voxel and never sees the damaged trailer)."""
  if not path.endswith('.gz'):
    return nib.load(path)
  with gzip.open(path, 'rb') as f:
    raw = f.read()  # verifies the stream's CRC and length at its end
  klass = nib.Nifti2Image if raw[:4] in (b'\x1c\x02\x00\x00',
                                         b'\x00\x00\x02\x1c') else nib.Nifti1Image
  return klass.from_bytes(raw)


def load_volume(path: str, problems: list):
  """Loads one NIfTI as float32 3D + (affine, spacing, header); problems appended, None on
  failure."""
  try:
    img = open_nifti(path)
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    problems.append(Problem(path, f'truncated or damaged gzip stream ({type(e).__name__}: {e})'))
    return None
  except Exception as e:  # nibabel raises many types for garbage headers
    problems.append(Problem(path, f'not a readable NIfTI file ({type(e).__name__}: {e})'))
    return None
  dtype = img.get_data_dtype()
  if dtype.kind not in 'iuf':  # complex, RGB, bool: not a scalar intensity image
    problems.append(Problem(path, f'unsupported voxel type {dtype} (expected integer or real '
                            'scalars)'))
    return None
  shape = img.shape
  if len(shape) == 4 and shape[3] == 1:
    pass
  elif len(shape) != 3:
    problems.append(Problem(path, f'expected a 3D volume, got shape {shape}'))
    return None
  if min(shape[:3]) < 1:
    problems.append(Problem(path, f'zero-size volume, shape {shape}'))
    return None
  try:
    data = np.asarray(img.dataobj, dtype=np.float32)
  except Exception as e:  # truncated gzip: EOFError, zlib.error, OSError, ValueError
    problems.append(Problem(path, f'corrupt or truncated data ({type(e).__name__}: {e})'))
    return None
  data = data.reshape(shape[:3])
  affine = np.asarray(img.affine, dtype=np.float64)
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
  if not np.all(np.isfinite(affine)) or np.any(spacing < 1e-6):
    problems.append(Problem(path, f'degenerate affine (voxel sizes {spacing.tolist()})'))
    return None
  return data, affine, spacing, img.header


def has_spatial_info(header) -> bool:
  """False for a NIfTI header whose qform and sform codes are both 0 (no orientation, no
  position)."""
  try:
    return int(header['qform_code']) > 0 or int(header['sform_code']) > 0
  except (KeyError, TypeError, ValueError):  # not a NIfTI header: trust its affine
    return True


def write_image(array, geom, prep_meta: dict, path: str):
  """Writes `array` (already on the case's ORIGINAL grid: u8 mask or f32 probability) with the
  original affine and the input's qform/sform codes, atomically (a temporary file, then a
  rename)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  affine = np.asarray(geom.original_affine)
  img = nib.Nifti1Image(array, affine)
  hdr = prep_meta.get('header', {})
  img.set_qform(affine, code=max(hdr.get('qform_code', 1), 1))
  img.set_sform(affine, code=max(hdr.get('sform_code', 1), 1))
  tmp = path[:-7] + f'.tmp-{os.getpid()}.nii.gz'
  nib.save(img, tmp)
  os.replace(tmp, path)


def write_mask(mask, geom, prep_meta: dict, path: str):
  """u8[X, Y, Z] mask on the original grid -> `path` (see write_image)."""
  write_image(np.asarray(mask, np.uint8), geom, prep_meta, path)
