"""MRI bias-field correction: N4 (Tustison et al. 2010) through SimpleITK, the field's own tool.

A coil's smooth multiplicative field makes one tissue brighter on one side of a scan than on the
other; the pseudo-label mixtures then split a tissue by position rather than by kind. N4 fits the
field as a B-spline over the brain and divides it out. It runs on a shrunken copy of the scan (the
field is smooth) and the fitted field is evaluated at full resolution. Optional: SimpleITK is only
imported when `data.bias_field='n4'`.
"""
import numpy as np

from cgc_jax import errors


def _sitk():
  try:
    import SimpleITK  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.DataError("data.bias_field='n4' needs SimpleITK: pip install SimpleITK "
                           "(or set data.bias_field='none')") from e
  return SimpleITK


def n4(channel: np.ndarray, brain: np.ndarray, spacing, shrink: int, iterations) -> np.ndarray:
  """One channel f32[X, Y, Z] (voxel size `spacing` mm) divided by its N4 bias field.

  brain: bool[X, Y, Z], the voxels the field is fitted on; outside it the channel is returned
  unchanged. shrink: the fit's down-sampling factor; iterations: iterations per fitting level (its
  length is the number of levels). Returns f32[X, Y, Z].
  """
  sitk = _sitk()
  x = np.asarray(channel, np.float32)
  if brain.sum() < 1000:  # too little brain for a field: leave the scan as it is
    return x
  floor = max(float(np.percentile(x[brain], 1)), 1e-3)
  positive = np.where(brain, np.maximum(x, floor), floor).astype(np.float32)
  # SimpleITK orders axes z, y, x: hand it the transposed array so its spacing matches
  image = sitk.GetImageFromArray(positive.transpose(2, 1, 0))
  image.SetSpacing(tuple(float(s) for s in spacing))
  mask = sitk.GetImageFromArray(brain.astype(np.uint8).transpose(2, 1, 0))
  mask.CopyInformation(image)
  small = sitk.Shrink(image, [int(shrink)] * 3)
  small_mask = sitk.Shrink(mask, [int(shrink)] * 3)
  corrector = sitk.N4BiasFieldCorrectionImageFilter()
  corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
  try:
    corrector.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image))
  except RuntimeError as e:  # ITK's exceptions: a case it cannot fit, named by prepare
    raise errors.DataError(f'N4 bias-field correction failed (data.bias_field=\'n4\', shrink '
                           f'{shrink}): {str(e).strip().splitlines()[-1][:200]}') from e
  log_field = log_field.transpose(2, 1, 0)
  if not np.all(np.isfinite(log_field[brain])):
    raise errors.DataError("N4 bias-field correction gave a non-finite field "
                           "(data.bias_field='n4')")
  out = x.copy()
  out[brain] = x[brain] / np.exp(log_field[brain])
  return out


def correct(channels: np.ndarray, brain: np.ndarray, spacing, data_cfg) -> np.ndarray:
  """Every channel of f32[X, Y, Z, C] corrected by its own N4 field (data_cfg.bias_field='n4'),
  else returned as it is. brain: bool[X, Y, Z]; spacing: mm per axis."""
  mode = data_cfg.get('bias_field', 'none')
  if mode == 'none':
    return channels
  if mode != 'n4':
    raise ValueError(f"data.bias_field={mode!r}: expected 'none' or 'n4'")
  if data_cfg.kind != 'mri':
    raise ValueError("data.bias_field='n4' is for MRI (data.kind='mri'); CT has no coil field")
  return np.stack([n4(channels[..., c], brain, spacing, data_cfg.n4_shrink,
                      tuple(data_cfg.n4_iterations)) for c in range(channels.shape[-1])], -1)
