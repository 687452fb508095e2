"""The predict stage: masks for new scans (prepared by the pipeline from eval.input_root) from a
trained workdir's networks (or a model package's, eval.package), on each scan's own grid, with
optional probability maps and pictures.

Outputs: WORKDIR/predict/masks/<case>.nii.gz, or the folder given by --output.
"""
from absl import logging

from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.inference import masks
from cgc_jax.inference import restore
from cgc_jax.inference import sliding_window
from cgc_jax.runtime import distributed


def predict(config, workdir: str, store: store_lib.Store, cases: list) -> str:
  """--mode=predict on new scans already prepared into `store` (the pipeline prepares them from
  eval.input_root): masks on their own grids, optional probability maps and overlay pictures.
  Returns the output folder."""
  distributed.initialize(config.dist)
  mesh = distributed.mesh()
  out_dir = paths.predict_output(config, workdir)
  if cases:
    nch = store.meta(cases[0])['arrays']['image']['shape'][-1]
    if config.eval.get('package', ''):
      from cgc_jax.inference import package  # pylint: disable=g-import-not-at-top
      _, params, manifest = package.read(config.eval.package)
      nets = [(p, frozenset()) for p in package.placed(config, params, mesh, config.eval.package)]
      step = manifest['steps']
    else:
      nets, step = restore.restore_networks(config, workdir, mesh, nch)
    predictor = sliding_window.Predictor(config, mesh)
    preds = masks.predict_cases(config, store, cases, nets, predictor, out_dir)
    if distributed.is_main() and config.eval.pictures:
      from cgc_jax.imaging import overlays  # pylint: disable=g-import-not-at-top  (matplotlib)
      overlays.write_predictions(out_dir, store, cases, {c: v[0] for c, v in preds.items()})
    logging.info('predict: %d masks from checkpoint step %s in %s', len(cases), step, out_dir)
  return out_dir
