"""A trained model as a Python function, for notebooks and other programs.

    from cgc_jax.segmenter import Segmenter
    seg = Segmenter.from_workdir('runs/demo')        # config and checkpoint from the workdir
    seg = Segmenter.from_package('model.zip')        # or a model package (--mode=export)
    mask = seg({'flair': flair, 't1': t1, 't1ce': t1ce, 't2': t2}, affine)

Volumes are the scan's own arrays (any orientation, as nibabel loads them), one per modality the
model was trained on, all on one grid with `affine`; the mask comes back on that same grid, exactly
what `--mode=predict` writes for the same files.
"""
import os

import numpy as np

from cgc_jax import pipeline
from cgc_jax.inference import masks
from cgc_jax.inference import restore
from cgc_jax.inference import sliding_window
from cgc_jax.runtime import distributed
from cgc_jax.stages import prepare


class Segmenter:
  """Example (run by tests/test_segmenter.py on a tiny trained workdir `workdir` and a case folder
  `case_dir` of the BraTS layout):

      import os
      import nibabel as nib
      from cgc_jax.segmenter import Segmenter
      seg = Segmenter.from_workdir(workdir)
      name = os.path.basename(case_dir)
      scans = {m: nib.load(os.path.join(case_dir, f'{name}_{m}.nii.gz')) for m in seg.modalities}
      mask = seg({m: s.get_fdata() for m, s in scans.items()}, scans['flair'].affine)
      prob = seg.probability({m: s.get_fdata() for m, s in scans.items()}, scans['flair'].affine)
  """

  def __init__(self, config, params, step: int):
    """params: one network's U-Net params, or a list of networks' (train.folds: the lesion
    probability is their mean)."""
    self.config = config
    self.params = params
    self.step = step
    self.modalities = tuple(config.data.modalities)
    self._predictor = sliding_window.Predictor(config, distributed.mesh())

  @classmethod
  def from_workdir(cls, workdir: str, step: int = -1):
    """Restores the config the workdir was run with (WORKDIR/config.json) and a checkpoint
    (step -1: as the config's eval.select says, normally the newest)."""
    config = pipeline.workdir_config(workdir)
    config.eval.step = step
    distributed.initialize(config.dist)
    nets, s = restore.restore_networks(config, workdir, distributed.mesh(),
                                       len(config.data.modalities))
    return cls(config, [p for p, _ in nets] if len(nets) > 1 else nets[0][0], s)

  @classmethod
  def from_package(cls, path: str):
    """A model package (--mode=export): its config and networks; no workdir needed."""
    from cgc_jax.inference import package  # pylint: disable=g-import-not-at-top
    config, params, manifest = package.read(path)
    distributed.initialize(config.dist)
    nets = package.placed(config, params, distributed.mesh(), path)
    return cls(config, nets if len(nets) > 1 else nets[0], manifest['steps'])

  def _prepare(self, volumes: dict, affine):
    missing = [m for m in self.modalities if m not in volumes]
    if missing:
      raise ValueError(f'volumes lack {missing}: the model was trained on {list(self.modalities)}')
    channels = [np.asarray(volumes[m], np.float32) for m in self.modalities]
    for m, ch in zip(self.modalities, channels):
      if ch.ndim != 3 or ch.shape != channels[0].shape:
        raise ValueError(f'volume {m!r}: shape {ch.shape}, expected 3D and the same as '
                         f'{self.modalities[0]!r} {channels[0].shape}')
      bad = int((~np.isfinite(ch)).sum())
      if bad:
        raise ValueError(f'volume {m!r}: {bad} NaN or Inf voxels')
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
      raise ValueError(f'affine: expected a finite 4x4 matrix, got shape {affine.shape}')
    arrays, geom, _ = prepare.preprocess(channels, affine, self.config.data)
    return arrays, geom

  def _segment(self, volumes: dict, affine, case_id: str):
    arrays, geom = self._prepare(volumes, affine)
    evidence, p = masks.case_mixture(self.config, arrays['image'], arrays['brain'], geom,
                                     self.modalities, case_id)
    prob, mask = masks.segment_prepared(self.config, self._predictor, self.params,
                                        arrays['image'], arrays['brain'], geom, evidence, p)
    return prob, mask, geom

  def __call__(self, volumes: dict, affine, case_id: str = '') -> np.ndarray:
    """{modality: f[X, Y, Z]} on one grid + affine f64[4, 4] -> lesion mask u8[X, Y, Z], same grid.
    case_id seeds the mixture of the lesion-evidence gate, as the pipeline does per case."""
    return self._segment(volumes, affine, case_id)[1]

  def probability(self, volumes: dict, affine, case_id: str = '') -> np.ndarray:
    """As __call__, but the lesion probability f32[X, Y, Z] (0 outside the brain box)."""
    from cgc_jax.imaging import geometry  # pylint: disable=g-import-not-at-top
    prob, _, geom = self._segment(volumes, affine, case_id)
    return geometry.to_original(prob.astype(np.float32), geom, order=1)
