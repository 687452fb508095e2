"""Spatial rules on binary lesion masks: connected components, hole filling, the lesion cleanup,
the network's border from P, and P's left-right symmetric voxels.

Every function takes and returns `bool[X, Y, Z]` on one grid (the prepared grid in the pipeline).
Components are 26-connected (a lesion touching itself only across a voxel corner is still one
lesion); holes are background not connected to the volume's border, in 3D and in every axial,
coronal and sagittal slice (a necrotic core open to one side in 3D is still enclosed in most
slices).
"""
import numpy as np
from scipy import ndimage

_CONN26 = np.ones((3, 3, 3), bool)


def components(mask: np.ndarray):
  """(labels i32[X, Y, Z], sizes i64[n]) of the 26-connected components; sizes[i] is label i+1's."""
  lab, n = ndimage.label(mask, _CONN26)
  sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
  return lab, sizes


def remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
  """Drops the components smaller than `min_voxels` (0: keep all)."""
  mask = np.asarray(mask, bool)
  if min_voxels <= 0 or not mask.any():
    return mask
  lab, sizes = components(mask)
  return np.concatenate([[False], sizes >= min_voxels])[lab]


def keep_major(mask: np.ndarray, fraction: float) -> np.ndarray:
  """Keeps the components of at least `fraction` x the largest one's size (0: keep all, 1: the
  largest only; ties all kept)."""
  mask = np.asarray(mask, bool)
  if fraction <= 0 or not mask.any():
    return mask
  lab, sizes = components(mask)
  return np.concatenate([[False], sizes >= fraction * sizes.max()])[lab]


def fill_holes(mask: np.ndarray) -> np.ndarray:
  """Fills enclosed background: in 3D, then in every slice along each of the three axes."""
  out = ndimage.binary_fill_holes(np.asarray(mask, bool))
  for axis in range(3):
    moved = np.moveaxis(out, axis, 0)
    out = np.moveaxis(np.stack([ndimage.binary_fill_holes(s) for s in moved]), 0, axis)
  return out


def grow(mask: np.ndarray, mm: float, spacing) -> np.ndarray:
  """Adds every voxel within `mm` (Euclidean, voxel centres, anisotropic `spacing` in mm) of the
  mask. At 2 mm isotropic, mm=2 adds the 6 face neighbours of each boundary voxel."""
  mask = np.asarray(mask, bool)
  if mm <= 0 or not mask.any():
    return mask
  dist = ndimage.distance_transform_edt(~mask, sampling=np.asarray(spacing, np.float64))
  return dist <= mm + 1e-6


def cleanup(mask: np.ndarray, brain: np.ndarray, open_iterations: int, keep_fraction: float,
            min_voxels: int, fill: bool) -> np.ndarray:
  """The pseudo-label cleanup, in this order: opening (cuts thin bridges and one-voxel rims along
  the brain edge), components below `min_voxels` dropped, components below `keep_fraction` of the
  largest dropped, holes filled (a dark necrotic core inside bright oedema), restricted to
  `brain`."""
  m = np.asarray(mask, bool)
  if open_iterations > 0:
    m = ndimage.binary_opening(m, iterations=open_iterations)
  m = keep_major(remove_small(m, min_voxels), keep_fraction)
  if fill:
    m = fill_holes(m)
  return m & np.asarray(brain, bool)


def filter_components(prob: np.ndarray, spacing, min_mm3: float, min_probability: float,
                      keep_fraction: float = 0.0, threshold: float = 0.5) -> np.ndarray:
  """Zeroes the lesion probability (f32[X, Y, Z]) of each component of `prob > threshold` smaller
  than `min_mm3` (voxel volume from `spacing`, mm) or whose mean probability is below
  `min_probability`, then of each remaining component smaller than `keep_fraction` x the largest
  remaining one (0: keep all; 1: the largest only, ties kept); other voxels are unchanged. A network
  that invents a lesion in a healthy scan does so in small or unsure blobs; a real lesion is
  neither. A lesion that is one mass (a glioma's whole tumour) has no satellites half its size, so
  the relative rule removes what the network marks away from it."""
  prob = np.asarray(prob, np.float32)
  mask = prob > threshold
  if (min_mm3 <= 0 and min_probability <= 0 and keep_fraction <= 0) or not mask.any():
    return prob
  lab, sizes = components(mask)
  mean_p = np.bincount(lab.ravel(), prob.ravel(), minlength=sizes.size + 1)[1:] / sizes
  keep = (sizes * float(np.prod(spacing)) >= min_mm3) & (mean_p >= min_probability)
  if keep_fraction > 0 and keep.any():
    keep &= sizes >= keep_fraction * sizes[keep].max()
  drop = np.concatenate([[False], ~keep])[lab]
  return np.where(drop, np.float32(0), prob)


def drop_edge_components(prob: np.ndarray, p: np.ndarray, brain: np.ndarray, spacing, mm: float,
                         threshold: float = 0.5) -> np.ndarray:
  """Zeroes each component of `prob > threshold` (f32[X, Y, Z]) that P (bool or f32 > 0 = lesion,
  same grid) does not touch and that lies mostly (at least half its voxels) within `mm` of the
  brain's edge (Euclidean distance of the voxel centre to the nearest voxel outside `brain`, mm
  from `spacing`); other voxels unchanged. What brain extraction leaves at the edge (a bright rim
  of bone or dura on CT) is marked by a network only where P did not mark it; a lesion P missed
  deep in the brain is kept."""
  prob = np.asarray(prob, np.float32)
  mask = prob > threshold
  if mm <= 0 or not mask.any():
    return prob
  depth = ndimage.distance_transform_edt(np.pad(np.asarray(brain, bool), 1),
                                         sampling=spacing)[1:-1, 1:-1, 1:-1]
  lab, sizes = components(mask)
  near = np.bincount(lab.ravel(), (depth <= mm).ravel(), minlength=sizes.size + 1)[1:]
  touched = np.bincount(lab.ravel(), (np.asarray(p) > 0).ravel(), minlength=sizes.size + 1)[1:]
  drop = np.concatenate([[False], (touched == 0) & (near >= 0.5 * sizes)])[lab]
  return np.where(drop, np.float32(0), prob)


BORDER_SIDES = ('clamp', 'reflect')


def refine_border(prob: np.ndarray, p: np.ndarray, spacing, mm: float,
                  threshold: float = 0.5, side: str = 'clamp') -> np.ndarray:
  """The network's border drawn by the case's own pseudo-label mixture.

  prob: f32[X, Y, Z] the network's lesion probability; p: bool[X, Y, Z] P (the case's mixture
  consensus) on the same grid, or f32 with 1 (P's lesion), 0 (P's normal tissue) and any other
  value (0.5: P has no say there); spacing: mm. Every voxel whose centre lies within `mm`
  (Euclidean, in mm) of the border of `prob > threshold`, on either side (a voxel of the mask within
  `mm` of a voxel outside it, or a voxel outside within `mm` of the mask), takes P's side of the
  threshold: with side 'clamp', max(prob, threshold + 0.01) where P marks it, min(prob,
  threshold - 0.01) where P says normal; with side 'reflect', the network's probability mirrored
  about the threshold (2 threshold - prob, within [0, 1]) where it is on the other side of P, so
  the network's confidence is kept and only its side changes (interpolated to a finer grid, the
  edge then runs where the two neighbours' confidences put it, not next to the clamped voxel);
  every other voxel (and a voxel where P has no say) keeps `prob`. So the network says
  where the lesion is (P's false lesions away from it and its missed cores do not enter) and the
  mixture, fitted to this scan's own intensities, says where its edge runs. The network's own value
  is kept where the two agree, so a probability resampled to another grid stays smooth. Returns
  f32[X, Y, Z]; `prob` unchanged when mm <= 0 or the mask is empty."""
  prob = np.asarray(prob, np.float32)
  mask = prob > threshold
  if mm <= 0 or not mask.any():
    return prob
  band = grow(mask, mm, spacing) & grow(~mask, mm, spacing)  # within mm of the other side
  p = np.asarray(p)
  if side == 'reflect':
    flipped = np.clip(np.float32(2 * threshold) - prob, 0.0, 1.0)
    lesion, normal = np.maximum(prob, flipped), np.minimum(prob, flipped)
  elif side == 'clamp':
    lesion = np.maximum(prob, np.float32(threshold + 0.01))
    normal = np.minimum(prob, np.float32(threshold - 0.01))
  else:
    raise ValueError(f'side must be one of {BORDER_SIDES}, got {side!r}')
  decided = np.where(p == 1, lesion, np.where(p == 0, normal, prob))
  return np.where(band, decided, prob).astype(np.float32)


def mirror_shift(brain: np.ndarray, max_shift: int = 10) -> int:
  """The left-right mirror of the prepared (RAS) grid that best overlays the brain on itself.

  brain: bool[X, Y, Z], axis 0 left-right. Returns the integer s in [-max_shift, max_shift] that
  maximises the overlap of `brain` with mirror(brain, s); ties go to the smallest |s|, then the
  negative one. A brain cropped off-centre has its midline away from the grid's centre; s moves the
  mirror plane to it (the plane sits at x = (X - 1 + s) / 2)."""
  b = np.asarray(brain, bool)
  best = None
  for s in sorted(range(-max_shift, max_shift + 1), key=lambda v: (abs(v), v)):
    overlap = int(np.count_nonzero(b & mirror(b, s)))
    if best is None or overlap > best[0]:
      best = (overlap, s)
  return best[1]


def mirror(a: np.ndarray, shift: int) -> np.ndarray:
  """a[X, ...] mirrored left-right about the plane x = (X - 1 + shift) / 2: out[x] = a[shift - x + X
  - 1], wrapped at the grid's edge (the brain box's margin keeps the brain clear of the wrap)."""
  return np.roll(np.asarray(a)[::-1], shift, axis=0)


def symmetric_lesion(p: np.ndarray, channel: np.ndarray, brain: np.ndarray, margin: float,
                     sigma: float) -> np.ndarray:
  """The voxels of P that look like normal tissue seen on both sides of the brain.

  p: bool[X, Y, Z] P; channel: f32[X, Y, Z] one normalised modality (FLAIR for BraTS), brighter in
  lesion; brain: bool[X, Y, Z]; the prepared RAS grid (axis 0 left-right). A voxel is returned when
  P marks it AND its mirror image (mirror_shift of the brain) AND the channel, smoothed by a
  Gaussian of `sigma` voxels, is less than `margin` above its mirror's value there. A tumour sits in
  one hemisphere and is brighter than the healthy tissue opposite; grey matter that P takes for
  lesion is on both sides and alike. Tumour that crosses the midline is both too, which is why the
  training loss only ignores these voxels (train.symmetry_margin) rather than calling them
  normal. Returns bool[X, Y, Z]."""
  p = np.asarray(p, bool)
  s = mirror_shift(brain)
  smooth = ndimage.gaussian_filter(np.asarray(channel, np.float32), sigma)  # sigma 0: unchanged
  return p & mirror(p, s) & (smooth - mirror(smooth, s) < margin)


def case_symmetric_lesion(case_id: str, p, image, brain, modalities, train_cfg) -> np.ndarray:
  """symmetric_lesion for one case with train.symmetry_* (modality, margin, sigma).

  p: P [X, Y, Z] (> 0 is lesion); image: f[X, Y, Z, C], channel k is modalities[k]; brain:
  [X, Y, Z] (> 0 is brain). Raises ValueError naming the case when it lacks
  train.symmetry_modality. Returns bool[X, Y, Z]."""
  mods = list(modalities)
  mod = train_cfg.symmetry_modality
  if mod not in mods:
    raise ValueError(f'{case_id}: train.symmetry_modality {mod!r} is not one of its modalities '
                     f'{mods}')
  return symmetric_lesion(np.asarray(p) > 0, np.asarray(image[..., mods.index(mod)], np.float32),
                          np.asarray(brain) > 0, train_cfg.symmetry_margin,
                          train_cfg.symmetry_sigma)
