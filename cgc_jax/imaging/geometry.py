"""Grid geometry: canonical (RAS) reorientation, brain-box crop, resampling, and the exact way back.

Forward (prepare): original array -> RAS canonical -> crop to the brain box (+margin) -> resample to
the target spacing. `to_original` undoes all three for any array on the prepared grid, so
pseudo-labels and predictions are written on each case's ORIGINAL grid with its original affine.
Resampling uses the same index map both ways: prepared voxel i sits at cropped-canonical voxel i *
scale, with scale = target_spacing / native_spacing (voxel centres aligned at index 0).
"""
import dataclasses
import nibabel as nib
import numpy as np
from scipy import ndimage

_RAS = nib.orientations.axcodes2ornt(('R', 'A', 'S'))


@dataclasses.dataclass
class Geometry:
  """JSON-serialisable description of how a prepared case maps to its original grid."""
  original_shape: tuple
  original_affine: list  # 4x4
  ornt: list  # nibabel orientation of the original array (io_orientation), 3x2
  canonical_shape: tuple
  crop_start: tuple
  crop_stop: tuple
  native_spacing: tuple  # mm, canonical axis order
  spacing: tuple  # mm of the prepared grid
  prepared_shape: tuple
  prepared_affine: list

  def to_json(self):
    return {k: (np.asarray(v).tolist()) for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_json(cls, d):
    return cls(**{k: (tuple(v) if k.endswith(('shape', 'start', 'stop', 'spacing')) else v)
                  for k, v in d.items()})

  @property
  def original_spacing(self) -> np.ndarray:
    """Voxel size (mm) of the original grid, in the original axis order."""
    a = np.asarray(self.original_affine)
    return np.sqrt((a[:3, :3] ** 2).sum(0))

  @property
  def scale(self) -> np.ndarray:
    return np.asarray(self.spacing, np.float64) / np.asarray(self.native_spacing, np.float64)

  def native(self) -> 'Geometry':
    """The geometry of the cropped canonical grid at native spacing (no resampling)."""
    crop = tuple(b - a for a, b in zip(self.crop_start, self.crop_stop))
    return dataclasses.replace(self, spacing=self.native_spacing, prepared_shape=crop)

  @property
  def resampled(self) -> bool:
    return not np.allclose(self.scale, 1.0)


def to_canonical(array: np.ndarray, affine: np.ndarray):
  """Reorients `array` ([X, Y, Z, ...]) to RAS. Returns (array, canonical affine, ornt)."""
  ornt = nib.orientations.io_orientation(affine)
  out = nib.orientations.apply_orientation(array, ornt)
  canon_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
  return np.ascontiguousarray(out), canon_affine, ornt


def plan(brain: np.ndarray, affine: np.ndarray, original_shape, ornt, canon_affine,
         margin_mm: float, target_spacing) -> Geometry:
  """Decides crop box and prepared grid for a canonical brain mask `brain: bool[X, Y, Z]`."""
  native = np.sqrt((canon_affine[:3, :3] ** 2).sum(0))
  lo, hi = [], []
  for ax in range(3):  # bounding box from 1D projections: no full-size index arrays
    hit = np.nonzero(np.any(brain, axis=tuple(a for a in range(3) if a != ax)))[0]
    lo.append(hit[0])
    hi.append(hit[-1] + 1)
  margin = np.ceil(margin_mm / native).astype(int)
  start = np.maximum(np.array(lo) - margin, 0)
  stop = np.minimum(np.array(hi) + margin, brain.shape)
  spacing = np.asarray(target_spacing, np.float64) if len(target_spacing) else native
  scale = spacing / native
  crop = stop - start
  shape = np.floor((crop - 1) / scale + 1e-6).astype(int) + 1
  prepared_affine = canon_affine @ _translate(start) @ np.diag(list(scale) + [1.0])
  return Geometry(tuple(int(s) for s in original_shape), np.asarray(affine).tolist(),
                  np.asarray(ornt).tolist(), tuple(int(s) for s in brain.shape),
                  tuple(int(s) for s in start), tuple(int(s) for s in stop),
                  tuple(float(s) for s in native), tuple(float(s) for s in spacing),
                  tuple(int(s) for s in shape), prepared_affine.tolist())


def _translate(t):
  m = np.eye(4)
  m[:3, 3] = t
  return m


def crop_and_resample(array: np.ndarray, geom: Geometry, order: int) -> np.ndarray:
  """Canonical `array` ([X, Y, Z] or [X, Y, Z, C]) -> prepared grid. order 1 images, 0 masks."""
  sl = tuple(slice(a, b) for a, b in zip(geom.crop_start, geom.crop_stop))
  return resample_cropped(array[sl], geom, order)


def resample_cropped(cropped: np.ndarray, geom: Geometry, order: int) -> np.ndarray:
  """An array already cropped to the box (canonical grid) -> prepared grid."""
  if not geom.resampled:
    return np.ascontiguousarray(cropped)
  return _resample(cropped, geom.scale, geom.prepared_shape, order)


def antialias(cropped: np.ndarray, brain: np.ndarray, geom: Geometry) -> np.ndarray:
  """Low-pass filters images before they are down-sampled onto a coarser prepared grid.

  cropped: f32[X, Y, Z, C] on the cropped canonical grid; brain: bool[X, Y, Z] there. Along each
  axis down-sampled by a factor s > 1 a Gaussian of sigma (s - 1) / 2 native voxels (the factor
  scikit-image's resize uses) averages away what the coarser grid cannot hold: noise that sampling
  every s-th voxel would keep at full strength. Averaged over the brain only (normalised
  convolution), so the zeros outside a skull-stripped brain do not darken its edge. Axes kept or
  up-sampled are not filtered; outside the brain the input is returned as it was.
  """
  sigma = np.maximum((np.asarray(geom.scale, np.float64) - 1.0) / 2.0, 0.0)
  if not np.any(sigma > 0):
    return cropped
  w = brain.astype(np.float32)
  den = ndimage.gaussian_filter(w, sigma, mode='constant')
  inside = brain & (den > 1e-3)
  out = np.array(cropped, np.float32, copy=True)
  for c in range(cropped.shape[-1]):
    num = ndimage.gaussian_filter(cropped[..., c].astype(np.float32) * w, sigma, mode='constant')
    out[..., c][inside] = num[inside] / den[inside]
  return out


def original_box(geom: Geometry) -> tuple:
  """The crop box as slices of the ORIGINAL array: `to_canonical(orig[box]) == canonical[crop]`."""
  ornt = np.asarray(geom.ornt)
  box = [None] * 3
  for i in range(3):  # original axis i becomes canonical axis ornt[i, 0], flipped if ornt[i, 1] < 0
    t = int(ornt[i, 0])
    a, b, n = geom.crop_start[t], geom.crop_stop[t], geom.original_shape[i]
    box[i] = slice(a, b) if ornt[i, 1] > 0 else slice(n - b, n - a)
  return tuple(box)


def _resample(array, scale, out_shape, order):
  scale = np.asarray(scale, np.float64)
  steps = np.round(scale).astype(int)
  if np.allclose(scale, steps) and np.all(steps >= 1):
    # integer down-sampling: index i lands exactly on voxel i * step, where interpolation of any
    # order returns the voxel itself: a strided view gives the same result, without the work
    out = array[::steps[0], ::steps[1], ::steps[2]][:out_shape[0], :out_shape[1], :out_shape[2]]
    if out.shape[:3] == tuple(out_shape):
      return np.ascontiguousarray(out)
  if array.ndim == 4:
    return np.stack([_resample(array[..., c], scale, out_shape, order)
                     for c in range(array.shape[-1])], -1)
  return ndimage.affine_transform(array, scale, output_shape=tuple(out_shape),
                                  order=order, mode='nearest', prefilter=False)


def to_original(array: np.ndarray, geom: Geometry, order: int = 0, fill=0) -> np.ndarray:
  """Maps `array` on the prepared grid ([X', Y', Z']) back to the original grid and voxel order.

  order 0 (nearest) for masks; order 1 for probabilities (threshold afterwards). Voxels outside the
  crop box get `fill`. The result has `geom.original_shape`; its affine is `geom.original_affine`.
  """
  if tuple(array.shape) != tuple(geom.prepared_shape):
    raise ValueError(f'array shape {array.shape} is not the prepared shape {geom.prepared_shape}')
  crop_shape = tuple(b - a for a, b in zip(geom.crop_start, geom.crop_stop))
  if geom.resampled:
    back = _resample(array, 1.0 / geom.scale, crop_shape, order)
  else:
    back = array
  canon = np.full(geom.canonical_shape, fill, dtype=back.dtype)
  canon[tuple(slice(a, b) for a, b in zip(geom.crop_start, geom.crop_stop))] = back
  ornt = np.asarray(geom.ornt)
  inverse = nib.orientations.ornt_transform(_RAS, ornt)
  out = nib.orientations.apply_orientation(canon, inverse)
  assert out.shape == tuple(geom.original_shape), (out.shape, geom.original_shape)
  return np.ascontiguousarray(out)


def prob_to_original_mask(prob: np.ndarray, geom: Geometry, threshold: float = 0.5) -> np.ndarray:
  """Foreground probability on the prepared grid -> u8 mask on the original grid.

  With resampling the probability is interpolated linearly before thresholding (smoother than
  nearest-neighbour on the mask); without, this is an exact index map.
  """
  prob = np.asarray(prob, np.float32)
  if geom.resampled:
    return (to_original(prob, geom, order=1) > threshold).astype(np.uint8)
  return to_original((prob > threshold).astype(np.uint8), geom, order=0)


def border_fill(channel: np.ndarray, min_fraction: float = 0.5):
  """The value that fills at least `min_fraction` of the voxels on the volume's six faces (the
  constant a brain extraction writes outside the head: 0, -1024, the scan's minimum), or None."""
  faces = np.concatenate([channel[0].ravel(), channel[-1].ravel(), channel[:, 0].ravel(),
                          channel[:, -1].ravel(), channel[:, :, 0].ravel(),
                          channel[:, :, -1].ravel()])
  values, counts = np.unique(faces, return_counts=True)
  i = int(np.argmax(counts))
  return values[i] if counts[i] >= min_fraction * faces.size else None


def outside_fill(channel: np.ndarray, fill) -> np.ndarray:
  """bool[X, Y, Z]: the voxels equal to `fill` that connect (6-neighbours) to the volume's border:
  the outside of a brain-extracted scan (equal voxels inside the brain, not connected to the
  border, stay in)."""
  lab, n = ndimage.label(channel == fill)  # int32 labels
  if n == 0:
    return np.zeros(channel.shape, bool)
  edge = np.unique(np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(),
                                   lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                   lab[:, :, -1].ravel()]))
  return np.isin(lab, edge[edge > 0])


def brain_mask(images, data_cfg) -> tuple:
  """Brain mask of `images: f32[X, Y, Z, C]` (or a list of C [X, Y, Z] channels), any orientation
  -> (bool[X, Y, Z], approximate: bool).

  MRI: nonzero in every channel (skull-stripped input); a channel whose outside is filled with
  another constant (border_fill: -1, its minimum) loses that outside instead. CT: above the
  background HU when brain-extracted, less an outside filled with a constant above it (0 HU, a
  common convention of CT brain-extraction tools) that reaches the border; otherwise an approximate
  HU-window mask (largest component, holes filled).
  """
  channels = [images[..., c] for c in range(images.shape[-1])] if isinstance(images, np.ndarray) \
      else list(images)
  if data_cfg.kind == 'mri':
    m = np.ones(channels[0].shape, bool)
    for ch in channels:
      fill = border_fill(ch)
      outside = None if fill is None or fill == 0 else outside_fill(ch, fill)
      # a constant filling the whole volume is no outside
      m &= (ch != 0) if outside is None or outside.all() else ~outside
    return m, False
  ct = channels[0]
  if data_cfg.ct_brain_extracted:
    m = ct > data_cfg.ct_background_below
    fill = border_fill(ct)
    if fill is not None and fill > data_cfg.ct_background_below:
      m &= ~outside_fill(ct, fill)
    return m, False
  lo, hi = data_cfg.ct_approx_brain_window
  m = ndimage.binary_opening((ct >= lo) & (ct <= hi), iterations=2)
  lab, n = ndimage.label(m)
  if n == 0:
    return m, True
  sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
  m = lab == (1 + int(np.argmax(sizes)))
  return ndimage.binary_fill_holes(m), True


def raw_scan_problem(brain: np.ndarray, channels, data_cfg):
  """Why `brain` (bool[X, Y, Z], from brain_mask) looks like the field of view rather than a brain,
  or None: it covers more than data.raw_scan_coverage of the volume, or reaches data.raw_scan_faces
  or more of the six faces (a quarter of a face's voxels or more), or (CT) more than
  data.ct_bone_fraction of it is above data.ct_bone_hu (skull). The signs of a scan that was not
  brain-extracted, or whose outside is noise rather than a constant."""
  coverage = float(brain.mean())
  faces = [brain[0], brain[-1], brain[:, 0], brain[:, -1], brain[:, :, 0], brain[:, :, -1]]
  touched = sum(float(f.mean()) >= 0.25 for f in faces)
  signs = []
  if coverage > data_cfg.raw_scan_coverage:
    signs.append(f'covers {coverage:.0%} of the volume')
  if touched >= data_cfg.raw_scan_faces:
    signs.append(f'reaches {touched} of its 6 faces')
  if data_cfg.kind == 'ct' and brain.any():
    bone = float((np.asarray(channels[0])[brain] > data_cfg.ct_bone_hu).mean())
    if bone > data_cfg.ct_bone_fraction:
      signs.append(f'is {bone:.0%} bone-range HU (> {data_cfg.ct_bone_hu:g})')
  if not signs:
    return None
  fix = ('brain-extract the scans first (e.g. SynthStrip or HD-BET), with a constant outside the '
         'brain')
  if data_cfg.kind == 'ct':
    fix += ', or set data.ct_brain_extracted=False for the approximate HU-window mask'
  return (f'the brain mask {" and ".join(signs)}: this looks like a scan that was not '
          f'brain-extracted (skull, scalp or a noisy background kept); {fix}')


def normalise(images: np.ndarray, brain: np.ndarray, data_cfg) -> np.ndarray:
  """MRI: per-channel z-score inside the brain (std 0 guarded); CT: HU window clip, scale to [0, 1].

  Voxels outside the brain are 0 afterwards.
  """
  out = np.zeros(images.shape, np.float32)
  if data_cfg.kind == 'ct':
    lo, hi = data_cfg.ct_window
    out = (np.clip(images, lo, hi) - lo) / (hi - lo)
  else:
    for c in range(images.shape[-1]):
      v = images[..., c][brain]
      mean = float(v.mean()) if v.size else 0.0
      std = float(v.std()) if v.size else 0.0
      out[..., c] = (images[..., c] - mean) / (std if std > 1e-8 else 1.0)
  out[~brain] = 0
  return out.astype(np.float32)


