"""Evaluate and predict stages: restore a checkpoint, sliding-window inference, masks on the original
grid, per-case metrics with the GMM (P) row beside the network's, summary table and pictures.

Outputs (WORKDIR/eval/): predictions/<case>.nii.gz (u8, original grid and affine), cases.csv,
summary.json, summary.md, pictures/<case>.png, pictures/dice.png; with eval.predictions_dir, masks
made elsewhere are scored instead (WORKDIR/eval_predictions/). Predict mode writes
WORKDIR/predict/masks/<case>.nii.gz for a folder of new scans (no labels needed).
"""
import csv
import io
import json
import os
import time

from absl import logging
import numpy as np

from cgc_jax import checkpoint
from cgc_jax import distributed
from cgc_jax import fingerprints
from cgc_jax import geometry
from cgc_jax import metrics
from cgc_jax import prepare
from cgc_jax import pseudo_labels
from cgc_jax import sliding_window
from cgc_jax import store as store_lib
from cgc_jax import train

CONVENTIONS = ('Dice and sensitivity on the original grid; ASSD and HD95 in mm (medpy definition: '
               'surface = mask minus its 6-connected erosion). Both masks empty: Dice 1, ASSD 0; '
               'exactly one empty: Dice 0, ASSD NaN (counted in "ASSD NaN", excluded from its mean).')


def restore_params(config, workdir, mesh, num_channels: int):
  """Params of checkpoint config.eval.step (-1: newest readable), replicated on `mesh`."""
  tx, _ = train.make_optimizer(config.train)
  target = train.abstract_state(config, mesh, num_channels, tx)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.train.keep_checkpoints)
  if ckpt.latest_step() is None:
    raise prepare.StageError(f'{ckpt.directory}: no checkpoint: run --mode=train first')
  step = None if config.eval.step < 0 else config.eval.step
  if step is not None and step not in ckpt.all_steps():
    raise prepare.StageError(f'{ckpt.directory}: no checkpoint at step {step} (have '
                             f'{ckpt.all_steps()})')
  state, record, s = ckpt.restore(target, step)
  ckpt.close()
  diffs = fingerprints.diff(record.get('fields', {}).get('model', {}),
                            fingerprints.fields(config, 'train')['model'])
  if diffs:
    raise checkpoint.IncompatibleCheckpointError(f'{ckpt.directory}: model config differs: {diffs}')
  return state.params['unet'], s


def predict_cases(config, prep: store_lib.Store, cases, params, predictor, out_dir):
  """Predicts every case; returns {case: (prob on prepared grid, mask on original grid)}."""
  out = {}
  t0 = time.time()
  for i, c in enumerate(cases):
    meta = prep.meta(c)
    geom = geometry.Geometry.from_json(meta['geometry'])
    image = np.asarray(prep.read(c, 'image', config.data.verify_checksums), np.float32)
    brain = np.asarray(prep.read(c, 'brain')) > 0
    prob = predictor.predict_volume(params, image) * brain
    mask = geometry.prob_to_original_mask(prob, geom)
    if distributed.is_main():
      pseudo_labels.write_mask(mask, geom, meta, os.path.join(out_dir, f'{c}.nii.gz'))
    out[c] = (prob, mask)
    el = time.time() - t0
    logging.info('predict: %d/%d cases (%.2f case/s, ETA %.0fs) %s', i + 1, len(cases),
                 (i + 1) / el, (len(cases) - i - 1) * el / (i + 1), c)
  return out


def _fmt(s, k):
  v = s[k]
  return f'{v["mean"]:.4f} +- {v["std"]:.4f}'


def summary_markdown(summaries: dict, seconds: float, step: int) -> str:
  lines = ['| method | cases | Dice | Sensitivity | ASSD [mm] | HD95 [mm] | ASSD NaN | empty pred |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for name, s in summaries.items():
    lines.append(f'| {name} | {s["cases"]} | {_fmt(s, "dice")} | {_fmt(s, "sensitivity")} | '
                 f'{_fmt(s, "assd")} | {_fmt(s, "hd95")} | {s["assd"]["nan_cases"]} | '
                 f'{s["empty_pred_cases"]} |')
  source = f'Checkpoint step {step}' if step is not None else 'Masks from eval.predictions_dir'
  lines += ['', f'{source}; evaluation time {seconds:.1f}s.', '', CONVENTIONS]
  return '\n'.join(lines) + '\n'


def evaluate(config, workdir: str):
  """--mode=evaluate on every prepared case (metrics where ground truth exists)."""
  distributed.initialize(config.dist)
  mesh = distributed.mesh()
  t0 = time.time()
  prep = prepare.prepared_store(config, workdir)
  labels = pseudo_labels.pl_store(config, workdir)
  cases = prep.complete_cases()
  if not cases:
    raise prepare.StageError(f'{prep.root}: no prepared cases')
  external = config.eval.predictions_dir
  out_dir = os.path.join(workdir, 'eval_predictions' if external else 'eval')
  fp = fingerprints.of(config, 'evaluate')
  if external:  # masks from elsewhere, checked case by case before any metric
    preds = {c: (None, m) for c, m in external_masks(external, prep, cases).items()}
    step = None
  else:
    nch = prep.meta(cases[0])['arrays']['image']['shape'][-1]
    params, step = restore_params(config, workdir, mesh, nch)
    done = _load_json(os.path.join(out_dir, 'summary.json'))
    if done and done.get('fingerprint') == fp and done.get('checkpoint_step') == step and \
       sorted(c['case'] for c in done.get('cases', [])) == sorted(
           c for c in cases if prep.meta(c)['has_label']):
      logging.info('evaluate: up to date for checkpoint step %d (%s)', step, out_dir)
      print(summary_markdown(done['summary'], done['seconds'], step))
      return done['summary']
    predictor = sliding_window.Predictor(config, mesh)
    preds = predict_cases(config, prep, cases, params, predictor,
                          os.path.join(out_dir, 'predictions'))
  rows = {'GMM w/ threshold (P)' if config.pseudo_labels.source == 'gmm'
          else f'P ({config.pseudo_labels.source})': [],
          f'predictions ({external})' if external else 'CGC network': []}
  p_name, n_name = list(rows)
  per_case = []
  p_masks = {}
  for c in cases:
    meta = prep.meta(c)
    if not meta['has_label']:
      continue
    geom = geometry.Geometry.from_json(meta['geometry'])
    ref = geometry.to_original(np.asarray(prep.read(c, 'label_native')), geom.native())
    mn = metrics.all_metrics(preds[c][1], ref, geom.original_spacing)
    rows[n_name].append(mn)
    row = {'case': c, **{f'net_{k}': v for k, v in mn.items()}}
    if labels.is_complete(c):
      post = np.asarray(labels.read(c, 'posterior'), np.float32)
      thr = config.gmm.threshold if config.pseudo_labels.source == 'gmm' else 0.5
      p_masks[c] = post > thr
      # the pseudo-label stage scored this same stored posterior on the same grid: reuse it
      mp = labels.meta(c)['report'].get('metrics') or metrics.all_metrics(
          geometry.prob_to_original_mask(post, geom, thr), ref, geom.original_spacing)
      rows[p_name].append(mp)
      row.update({f'p_{k}': v for k, v in mp.items()})
    per_case.append(row)
  if not per_case:
    logging.info('evaluate: no case has ground truth: masks written, no metrics')
    return None
  summaries = {k: metrics.summarise(v) for k, v in rows.items() if v}
  seconds = time.time() - t0
  if distributed.is_main():
    _write_reports(out_dir, per_case, summaries, seconds, step, fp)
    if config.eval.pictures and not external:
      from cgc_jax import overlays  # pylint: disable=g-import-not-at-top
      overlays.write_all(out_dir, prep, cases, {c: v[0] for c, v in preds.items()}, p_masks,
                         per_case, p_name, n_name)
  md = summary_markdown(summaries, seconds, step)
  logging.info('evaluation (%d cases with ground truth):\n%s', len(per_case), md)
  print(md)
  return summaries


def external_masks(folder: str, prep: store_lib.Store, cases: list) -> dict:
  """{case: bool mask on the original grid} from folder/<case>.nii.gz for every case with ground
  truth. Raises StageError listing EVERY case whose mask is missing, unreadable, or not on the
  case's original grid (shape, affine): never a silent skip."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  masks, missing, wrong = {}, [], []
  for c in cases:
    meta = prep.meta(c)
    if not meta['has_label']:
      continue
    geom = geometry.Geometry.from_json(meta['geometry'])
    path = os.path.join(folder, f'{c}.nii.gz')
    if not os.path.exists(path):
      missing.append(c)
      continue
    try:
      img = nib.load(path)
      mask = np.asarray(img.dataobj)
    except Exception as e:  # pylint: disable=broad-except
      wrong.append(f'{c}: {path} unreadable ({type(e).__name__}: {e})')
      continue
    if mask.dtype.kind == 'f' and not np.all(np.isfinite(mask)):
      wrong.append(f'{c}: {path} has NaN or Inf values')
    elif mask.shape != tuple(geom.original_shape):
      wrong.append(f'{c}: shape {mask.shape}, the scan has {tuple(geom.original_shape)}')
    elif not np.allclose(img.affine, geom.original_affine, atol=1e-3):
      wrong.append(f'{c}: affine differs from the scan\'s')
    else:
      masks[c] = mask > 0.5
  if missing or wrong:
    lines = ([f'missing ({len(missing)}): {", ".join(missing)}'] if missing else []) + wrong
    raise prepare.StageError(f'{folder}: predictions do not match the cases to evaluate; nothing '
                             'was scored:\n  ' + '\n  '.join(lines))
  return masks


def _load_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_reports(out_dir, per_case, summaries, seconds, step, fp):
  os.makedirs(out_dir, exist_ok=True)
  buf = io.StringIO()
  keys = sorted({k for r in per_case for k in r} - {'case'})
  w = csv.DictWriter(buf, ['case'] + keys)
  w.writeheader()
  w.writerows(per_case)
  store_lib.atomic_write_text(os.path.join(out_dir, 'cases.csv'), buf.getvalue())
  store_lib.atomic_write_json(os.path.join(out_dir, 'summary.json'),
                              {'summary': summaries, 'seconds': seconds, 'checkpoint_step': step,
                               'fingerprint': fp,
                               'conventions': CONVENTIONS, 'cases': per_case})
  store_lib.atomic_write_text(os.path.join(out_dir, 'summary.md'),
                              summary_markdown(summaries, seconds, step))


def predict(config, workdir: str):
  """--mode=predict: new scans in config.eval.input_root -> masks on their own grids."""
  if not config.eval.input_root:
    raise prepare.StageError('--mode=predict needs --config.eval.input_root=/folder/of/new/scans')
  distributed.initialize(config.dist)
  mesh = distributed.mesh()
  root = os.path.join(workdir, 'predict')
  store = store_lib.Store(os.path.join(root, 'prepared'), fingerprints.of(config, 'prepare'))
  failed = None
  try:
    cases = prepare.run(config, workdir, root=config.eval.input_root, store=store)
  except prepare.StageError as e:  # bad scans: predict the good ones, then report the bad ones
    failed, cases = e, e.done
  if cases:
    nch = store.meta(cases[0])['arrays']['image']['shape'][-1]
    params, step = restore_params(config, workdir, mesh, nch)
    predictor = sliding_window.Predictor(config, mesh)
    predict_cases(config, store, cases, params, predictor, os.path.join(root, 'masks'))
    logging.info('predict: %d masks from checkpoint step %d in %s', len(cases), step,
                 os.path.join(root, 'masks'))
  if failed:
    raise prepare.StageError(f'{failed}\npredict: masks were written for the {len(cases)} readable '
                             'scans only', cases)


def dice_during_training(config, workdir, mesh):
  """Returns f(params, step) logging the network's mean Dice on cases with ground truth (analysis
  only: it never feeds training or checkpoint choice)."""
  prep = prepare.prepared_store(config, workdir)
  cases = [c for c in prep.complete_cases() if prep.meta(c)['has_label']]
  if not cases:
    return None
  predictor = sliding_window.Predictor(config, mesh)
  path = os.path.join(workdir, 'train', 'eval_dice.jsonl')

  def f(params, step):
    ds = []
    for c in cases:
      image = np.asarray(prep.read(c, 'image'), np.float32)
      brain = np.asarray(prep.read(c, 'brain')) > 0
      prob = predictor.predict_volume(params['unet'], image) * brain
      ds.append(metrics.dice(prob > 0.5, np.asarray(prep.read(c, 'label')) > 0))
    logging.info('step %d: network Dice on the prepared grid (analysis only) %.4f +- %.4f', step,
                 float(np.mean(ds)), float(np.std(ds)))
    if distributed.is_main():
      with open(path, 'a') as fh:
        fh.write(json.dumps({'step': step, 'dice_mean': float(np.mean(ds)),
                             'dice': dict(zip(cases, ds))}) + '\n')
  return f
