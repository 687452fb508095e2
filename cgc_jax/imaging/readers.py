"""Case discovery and NIfTI loading for the brats, folder and cq500 layouts.

A layout only decides where a case's files are; loading and checking are shared. Array contract of a
loaded case: `channels`: C arrays f32[X, Y, Z] in the files' own voxel order (C =
len(data.modalities), in that order; `.images` stacks them to f32[X, Y, Z, C]), `label: u8[X, Y, Z]`
or None, `affine: f64[4, 4]` of the first modality, `spacing: (3,) mm`. Nothing is reoriented here
(see geometry.py).
"""
import dataclasses
import glob
import gzip
import os
import re
import zlib
from typing import Optional

from absl import logging
import nibabel as nib
import numpy as np

from cgc_jax import errors
from cgc_jax.imaging import dicom
from cgc_jax.imaging import nifti


@dataclasses.dataclass
class CaseFiles:
  """Where one case's files are. `missing` lists configured files that do not exist."""
  case_id: str
  images: dict  # modality -> path
  label: Optional[str]
  missing: list = dataclasses.field(default_factory=list)


DataError = errors.DataError  # defined in errors.py (every user-facing error in one place)


def _case_dirs(root: str, layout: str) -> list:
  if not root:
    raise DataError('config.data.root is empty: give --config.data.root=/path/to/cases')
  if not os.path.isdir(root):
    raise DataError(f'{root}: data root does not exist or is not a folder')
  dirs = []
  for sub in ('HGG', 'LGG') if layout == 'brats' else ():
    if os.path.isdir(os.path.join(root, sub)):
      dirs += [d for d in sorted(glob.glob(os.path.join(root, sub, '*'))) if os.path.isdir(d)]
  flat = [d for d in sorted(glob.glob(os.path.join(root, '*')))
          if os.path.isdir(d) and os.path.basename(d) not in ('HGG', 'LGG')]
  dirs += flat
  if not dirs:
    raise DataError(f'{root}: no case folders found for layout {layout!r}')
  return dirs


_NNUNET_CHANNEL = re.compile(r'^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$')


def is_nnunet_folder(root: str) -> bool:
  """A folder of nnU-Net raw-layout images (CASE_0000.nii.gz, ...), or one holding imagesTr/ or
  imagesTs/."""
  if not os.path.isdir(root):
    return False
  if any(os.path.isdir(os.path.join(root, d)) for d in ('imagesTr', 'imagesTs')):
    return True
  return any(_NNUNET_CHANNEL.match(n) for n in os.listdir(root))


def discover_nnunet(data_cfg, root: str) -> list:
  """The nnU-Net raw layout: ROOT/imagesTr/CASE_XXXX.nii.gz (and imagesTs/), channel XXXX =
  data.modalities[XXXX], labels from ROOT/labelsTr/CASE.nii.gz when present; or a bare folder of
  CASE_XXXX files. Missing channels are listed per case, as for the other layouts."""
  folders = [os.path.join(root, d) for d in ('imagesTr', 'imagesTs')
             if os.path.isdir(os.path.join(root, d))] or [root]
  cases = {}
  for folder in folders:
    for name in sorted(os.listdir(folder)):
      m = _NNUNET_CHANNEL.match(name)
      if m:
        cases.setdefault(m['case'], (folder, {}))[1][int(m['channel'])] = os.path.join(folder, name)
  if not cases:
    raise DataError(f'{root}: no CASE_0000.nii.gz images found (nnU-Net raw layout)')
  out = []
  for case_id, (folder, chans) in sorted(cases.items()):
    images, missing = {}, []
    for i, mod in enumerate(data_cfg.modalities):
      path = chans.get(i, os.path.join(folder, f'{case_id}_{i:04d}.nii.gz'))
      images[mod] = path
      if i not in chans:
        missing.append(path)
    label = os.path.join(root, 'labelsTr', f'{case_id}.nii.gz')
    out.append(CaseFiles(case_id, images, label if os.path.exists(label) else None, missing))
  return out


def _case_files(data_cfg, d: str) -> CaseFiles:
  """The configured files of the case in folder `d` (case id = the folder's name)."""
  case_id = os.path.basename(d.rstrip('/'))
  images, missing = {}, []
  for m in data_cfg.modalities:
    if m not in data_cfg.filenames:
      raise DataError(f'config.data.filenames has no entry for modality {m!r}')
    path = os.path.join(d, data_cfg.filenames[m].format(case=case_id))
    if not os.path.exists(path) and dicom.is_series_folder(os.path.join(d, m)):
      path = os.path.join(d, m)  # a DICOM series in a folder named for the modality
    elif not os.path.exists(path) and data_cfg.kind == 'ct' and len(data_cfg.modalities) == 1:
      chosen, why, _ = dicom.choose_ct_series(d)  # a CQ500 study folder: one series of several
      if chosen:
        logging.info('%s: %s: %s', case_id, os.path.relpath(chosen, d), why)
        path = chosen
    images[m] = path
    if not os.path.exists(path):
      missing.append(path)
  label = None
  if data_cfg.label:
    label = os.path.join(d, data_cfg.label.format(case=case_id))
    if not os.path.exists(label):
      label = None  # labels are optional: evaluation-only
  return CaseFiles(case_id, images, label, missing)


def _is_case_folder(data_cfg, d: str) -> bool:
  """`d` itself holds a case (its first modality's file or series folder), rather than case
  folders."""
  first = data_cfg.modalities[0]
  return (first in data_cfg.filenames and os.path.exists(os.path.join(
      d, data_cfg.filenames[first].format(case=os.path.basename(d.rstrip('/')))))) or \
      dicom.is_series_folder(os.path.join(d, first))


def discover(data_cfg, root: Optional[str] = None) -> list:
  """Lists the cases under `root` (default data_cfg.root) as CaseFiles, sorted by case id.

  Layouts: brats, folder, cq500 (config.data.layout); a root in the nnU-Net raw layout
  (imagesTr/imagesTs, CASE_XXXX.nii.gz channels in data.modalities order) is read as such whatever
  the configured layout, so a model trained on BraTS predicts an nnU-Net dataset as it is."""
  layout = data_cfg.layout
  root = root or data_cfg.root
  if layout not in ('brats', 'folder', 'cq500'):
    raise DataError(f'unknown config.data.layout {layout!r} (brats | folder | cq500 | phantoms)')
  if root and is_nnunet_folder(root):
    return discover_nnunet(data_cfg, root)
  if root and os.path.isfile(root):  # one scan: a single-modality config's whole case
    if len(data_cfg.modalities) != 1:
      raise DataError(f'{root}: a single file gives one channel, the config needs '
                      f'{list(data_cfg.modalities)}: give the case folder instead')
    case_id = re.sub(r'\.nii(\.gz)?$', '', os.path.basename(root))
    return [CaseFiles(case_id, {data_cfg.modalities[0]: root}, None, [])]
  if root and os.path.isdir(root) and _is_case_folder(data_cfg, root):
    return [_case_files(data_cfg, root)]
  cases = []
  seen = {}
  for d in _case_dirs(root, layout):
    case_id = os.path.basename(d.rstrip('/'))
    if case_id in seen:
      raise DataError(f'{d}: case id {case_id!r} also at {seen[case_id]}')
    seen[case_id] = d
    cases.append(_case_files(data_cfg, d))
  return cases


@dataclasses.dataclass
class LoadedCase:
  case_id: str
  # C arrays f32[X, Y, Z], in data.modalities order (not stacked: prepare crops first)
  channels: list
  affine: np.ndarray  # f64[4, 4]
  spacing: np.ndarray  # f64[3]
  header: object  # nibabel header of the first modality (written back with predictions)
  files: CaseFiles
  warnings: list

  @property
  def images(self) -> np.ndarray:
    """f32[X, Y, Z, C] (a stacked copy)."""
    return np.stack(self.channels, axis=-1)


def geometry_problems(path: str, vol: tuple, ref_path: str, ref: tuple, any_spatial: bool,
                      data_cfg) -> list:
  """Problems of one channel's (or the label's) grid against the case's reference channel.

  vol, ref: (data, affine, spacing, header) as nifti.load_volume gives them; any_spatial: whether
  some channel of the case has spatial information (the reference is then one that does). A shape
  or spacing mismatch is an error; a header without spatial information is a warning; an affine
  mismatch is an error with data.strict_geometry, else a warning (all within
  data.affine_tolerance).
  """
  data, affine, spacing, hdr = vol
  if data.shape != ref[0].shape:
    return [nifti.Problem(path, f'shape {data.shape} differs from {ref[0].shape} of {ref_path}')]
  if not nifti.has_spatial_info(hdr):
    where = (f'the case geometry is taken from {ref_path}' if any_spatial else
             'no channel of this case has any: voxel indices are used as 1 mm coordinates')
    return [nifti.Problem(path, 'header has no spatial information (qform and sform codes '
                          f'0); {where}', 'warning')]
  if not np.allclose(spacing, ref[2], atol=data_cfg.affine_tolerance):
    return [nifti.Problem(path, f'voxel spacing {np.round(spacing, 4).tolist()} differs from '
                          f'{np.round(ref[2], 4).tolist()} of {ref_path}')]
  if not np.allclose(affine, ref[1], atol=data_cfg.affine_tolerance):
    return [nifti.Problem(path, f'affine differs from that of {ref_path}',
                          'error' if data_cfg.strict_geometry else 'warning')]
  return []


def intensity_problems(path: str, data: np.ndarray, data_cfg) -> list:
  """Problems of one image's values: NaN/Inf or a constant image (errors), and for CT values that
  do not look like Hounsfield units (a warning: min >= 0, or the median above
  data.ct_background_below outside [-100, 150])."""
  lo, hi = float(data.min()), float(data.max())  # NaN propagates: one pass each, no masks
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return [nifti.Problem(path, f'{int((~np.isfinite(data)).sum())} NaN or Inf voxels')]
  if lo == hi:
    return [nifti.Problem(path, f'constant image (every voxel = {lo:g}): failed brain extraction '
                          'or an empty export?')]
  if data_cfg.kind == 'ct':
    inside = data[data > data_cfg.ct_background_below]
    med = float(np.median(inside)) if inside.size else float('nan')
    if lo >= 0 or not -100 <= med <= 150:
      return [nifti.Problem(path, f'intensities do not look like Hounsfield units (min {lo:g}, '
                            f'median of non-background {med:g}): rescale slope/intercept lost?',
                            'warning')]
  return []


def label_problems(path: str, lab: np.ndarray, label_values) -> list:
  """Problems of a label volume: NaN/Inf, or values outside `label_values` (0 always allowed)."""
  if not (np.isfinite(lab.min()) and np.isfinite(lab.max())):
    return [nifti.Problem(path, f'{int((~np.isfinite(lab)).sum())} NaN or Inf voxels')]
  values = np.unique(lab[lab != 0])  # 0 is always background; sorting the rest is cheap
  bad = sorted(set(values.tolist()) - set(float(v) for v in label_values) - {0.0})
  if bad:
    return [nifti.Problem(path, f'label values {bad[:10]} not in the allowed set '
                          f'{list(label_values)}')]
  return []


def load_case(files: CaseFiles, data_cfg) -> LoadedCase:
  """Loads and verifies one case's images (never its label: references.py reads that). Raises
  DataError listing EVERY problem found (each with its file)."""
  problems = [nifti.Problem(p, 'missing file (configured modality)') for p in files.missing]
  vols = {}
  for m, path in files.images.items():
    if path in files.missing:
      continue
    v = dicom.load_series(path, problems) if os.path.isdir(path) else \
        nifti.load_volume(path, problems)
    if v is not None:
      vols[m] = v

  # the case's geometry comes from the first channel that HAS spatial information: a header with
  # qform and sform codes 0 carries none (nibabel makes up an affine from pixdim)
  spatial = [m for m, v in vols.items() if nifti.has_spatial_info(v[3])]
  ref_mod = spatial[0] if spatial else next(iter(vols), None)
  ref = vols.get(ref_mod)
  if ref is not None:
    for m, vol in vols.items():
      problems += geometry_problems(files.images[m], vol, files.images[ref_mod], ref,
                                    bool(spatial), data_cfg)
  for m, (data, *_) in vols.items():
    problems += intensity_problems(files.images[m], data, data_cfg)

  errors = [p for p in problems if p.severity == 'error']
  if errors:
    raise DataError('\n'.join(str(p) for p in problems))
  return LoadedCase(
      case_id=files.case_id, channels=[vols[m][0] for m in data_cfg.modalities],
      affine=ref[1], spacing=ref[2], header=ref[3], files=files,
      warnings=[p for p in problems if p.severity == 'warning'])


def load_label(path: str, ref: tuple, ref_path: str, any_spatial: bool, data_cfg) -> tuple:
  """A case's ground truth checked against its images: (u8[X, Y, Z] 1 = lesion, or None, warnings).

  ref: the case's reference grid (data or an array of its shape, affine, spacing, header) as
  nifti.load_volume gives it, from `ref_path`; any_spatial: whether that grid carries spatial
  information. Ground truth only scores, so a label that cannot be read, sits on another grid or
  holds values outside data.label_values is never an error: it is returned as None with warnings
  that name the file (the case is then not scored).
  """
  probs = []
  vol = nifti.load_volume(path, probs)
  if vol is not None:
    probs += geometry_problems(path, vol, ref_path, ref, any_spatial, data_cfg)
  if vol is not None and not any(p.severity == 'error' for p in probs):
    probs += label_problems(path, vol[0], data_cfg.label_values)
  if vol is None or any(p.severity == 'error' for p in probs):
    return None, [nifti.Problem(p.path, f'{p.message} (the label is skipped: this case is not '
                                'scored)', 'warning') for p in probs]
  return (vol[0] > 0).astype(np.uint8), probs
