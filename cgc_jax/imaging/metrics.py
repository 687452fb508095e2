"""Segmentation metrics on binary masks: Dice, sensitivity, ASSD and HD95 (medpy >= 0.5
definitions).

Conventions (also written into every report):
  * both masks empty: Dice 1, sensitivity 1, ASSD 0, HD95 0;
  * exactly one empty: Dice 0, sensitivity 0 (or 1 if the reference is empty), ASSD and HD95 NaN;
    reports count these cases instead of dropping them.
Surface voxels = mask minus its 6-connected erosion (medpy's `__surface_distances`). Distances are
in mm from the REFERENCE's voxel spacing, given as `spacing` (one value per axis, anisotropy
allowed). ASSD pools the surface distances of both directions and takes one mean (medpy >= 0.5,
MONAI's `compute_average_surface_distance(symmetric=True)`); the mean of the two one-way means
(medpy < 0.5) weights the mask with the smaller surface more and differs by millimetres on uneven
masks.
"""
import numpy as np
from scipy import ndimage

from cgc_jax.imaging import morphology


def _b(x):
  return np.asarray(x).astype(bool)


def dice(pred, ref) -> float:
  pred, ref = _b(pred), _b(ref)
  s = pred.sum() + ref.sum()
  if s == 0:
    return 1.0
  return float(2.0 * np.logical_and(pred, ref).sum() / s)


def sensitivity(pred, ref) -> float:
  pred, ref = _b(pred), _b(ref)
  n = ref.sum()
  if n == 0:
    return 1.0
  return float(np.logical_and(pred, ref).sum() / n)


def _surface(mask):
  fp = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask ^ ndimage.binary_erosion(mask, structure=fp, iterations=1)


def _surface_distances(pred, ref, spacing):
  """Both directed surface-distance samples (pred->ref, ref->pred), on the union's bounding box.

  Every surface voxel of both masks lies inside the box, so each voxel's nearest surface voxel does
  too: the distances equal those computed on the whole volume.
  """
  both = pred | ref
  idx = np.nonzero(both)
  box = tuple(slice(max(i.min() - 1, 0), i.max() + 2) for i in idx)
  pred, ref = pred[box], ref[box]
  sp, sr = _surface(pred), _surface(ref)
  dt_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
  dt_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
  return dt_ref[sp], dt_pred[sr]


def assd(pred, ref, spacing=(1.0, 1.0, 1.0)) -> float:
  """Average symmetric surface distance (mm): the mean of the pooled surface distances of both
  directions, (sum(d_pred->ref) + sum(d_ref->pred)) / (|S_pred| + |S_ref|)."""
  pred, ref = _b(pred), _b(ref)
  if not pred.any() and not ref.any():
    return 0.0
  if not pred.any() or not ref.any():
    return float('nan')
  a, b = _surface_distances(pred, ref, np.asarray(spacing, np.float64))
  return float(np.hstack([a, b]).mean())


def hd95(pred, ref, spacing=(1.0, 1.0, 1.0)) -> float:
  """95th percentile of the pooled symmetric surface distances (mm), as medpy's hd95."""
  pred, ref = _b(pred), _b(ref)
  if not pred.any() and not ref.any():
    return 0.0
  if not pred.any() or not ref.any():
    return float('nan')
  a, b = _surface_distances(pred, ref, np.asarray(spacing, np.float64))
  return float(np.percentile(np.hstack([a, b]), 95))


def all_metrics(pred, ref, spacing) -> dict:
  pred, ref = _b(pred), _b(ref)
  return {'dice': dice(pred, ref), 'sensitivity': sensitivity(pred, ref),
          'assd': assd(pred, ref, spacing), 'hd95': hd95(pred, ref, spacing),
          'pred_voxels': int(pred.sum()), 'ref_voxels': int(ref.sum())}


def summarise(rows: list, keys=('dice', 'sensitivity', 'assd', 'hd95')) -> dict:
  """mean, std over cases per metric (NaNs excluded and counted) + empty-mask case counts."""
  out = {'cases': len(rows)}
  for k in keys:
    v = np.array([r[k] for r in rows], np.float64)
    ok = v[np.isfinite(v)]
    out[k] = {
        'mean': float(ok.mean()) if ok.size else float('nan'),
        'std': float(ok.std()) if ok.size else float('nan'),
        'nan_cases': int((~np.isfinite(v)).sum())
    }
  out['empty_pred_cases'] = int(sum(r['pred_voxels'] == 0 for r in rows))
  out['empty_ref_cases'] = int(sum(r['ref_voxels'] == 0 for r in rows))
  return out


STATISTICS = ('case', 'lesion_ml', 'components', 'largest_ml', 'mean_probability', 'gate')


def lesion_statistics(case: str, mask, spacing, prob=None, gate: str = 'off') -> dict:
  """One row of statistics.csv: the lesion of a mask, no ground truth needed.

  mask: bool[X, Y, Z] on the scan's original grid with voxel size `spacing` (mm). lesion_ml: its
  volume (voxels x voxel volume / 1000); components: 26-connected pieces; largest_ml: the largest
  piece's volume; mean_probability: mean of prob (the network's lesion probability, any grid) over
  its voxels above 0.5, '' without any; gate: the lesion-evidence gate's verdict ('lesion',
  'no_lesion_evidence': an empty mask without running the network, or 'off').
  """
  m = _b(mask)
  _, sizes = morphology.components(m)
  n = len(sizes)
  voxel_ml = float(np.prod(np.asarray(spacing, np.float64))) / 1000.0
  largest = int(sizes.max()) if n else 0
  above = None if prob is None else np.asarray(prob)[np.asarray(prob) > 0.5]
  mean_p = '' if above is None or not above.size else round(float(above.mean()), 4)
  return {'case': case, 'lesion_ml': round(int(m.sum()) * voxel_ml, 4), 'components': int(n),
          'largest_ml': round(largest * voxel_ml, 4), 'mean_probability': mean_p, 'gate': gate}

