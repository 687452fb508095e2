"""The evaluate stage: every prepared case segmented by the workdir's networks (or masks made
elsewhere, eval.predictions_dir), scored against its ground truth on the original grid with P's
row beside the network's; cases.csv, summary.json, summary.md and pictures.

Outputs (WORKDIR/eval/): predictions/<case>.nii.gz (u8, original grid and affine), cases.csv,
summary.json, summary.md, pictures/<case>.png, pictures/dice.png; with eval.predictions_dir, masks
made elsewhere are scored instead (WORKDIR/eval_predictions/).
"""
import csv
import io
import json
import os
import time
from typing import Optional

from absl import logging
import numpy as np

from cgc_jax import errors
from cgc_jax.core import compat
from cgc_jax.core import fingerprints
from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import geometry
from cgc_jax.imaging import metrics
from cgc_jax.inference import masks
from cgc_jax.labels import references
from cgc_jax.inference import restore
from cgc_jax.inference import sliding_window
from cgc_jax.runtime import distributed

CONVENTIONS = (
    'Dice and sensitivity on the original grid; ASSD and HD95 in mm (medpy >= 0.5 '
    'definitions: surface = mask minus its 6-connected erosion; ASSD = mean of the '
    'surface distances of both directions pooled). Both masks empty: Dice 1, ASSD 0; '
    'exactly one empty: Dice 0, ASSD NaN (counted in "ASSD NaN", excluded from its mean).')


def evaluate(config, workdir: str):
  """--mode=evaluate on every prepared case (metrics where ground truth exists). Two sources of
  masks: the workdir's networks (skipped when the last evaluation still stands), or
  eval.predictions_dir's masks (checked case by case before any metric)."""
  distributed.initialize(config.dist)
  t0 = time.time()
  prep = paths.prepared_store(config, workdir)
  labels = paths.pl_store(config, workdir)
  cases = prep.complete_cases()
  if not cases:
    raise errors.StageError(f'{prep.root}: no prepared cases')
  refs = paths.reference_store(config, workdir)
  if config.eval.predictions_dir:
    out_dir = os.path.join(workdir, 'eval_predictions')
    preds = {c: (None, m) for c, m in external_masks(config.eval.predictions_dir, prep, refs,
                                                       cases).items()}
    return _score(config, prep, labels, refs, cases, preds, None, out_dir, t0)
  out_dir = os.path.join(workdir, paths.EVAL)
  mesh = distributed.mesh()
  nch = prep.meta(cases[0])['arrays']['image']['shape'][-1]
  nets, step = restore.restore_networks(config, workdir, mesh, nch)
  done = _load_json(os.path.join(out_dir, 'summary.json'))
  fp, inputs = fingerprints.of(config, 'evaluate'), _inputs(prep, labels, refs, cases)
  if is_current(done, fp, step, inputs, [c for c in cases if refs.is_complete(c)],
                not config.eval.pictures or _pictures_complete(out_dir, cases)):
    logging.info('evaluate: up to date for checkpoint step %d (%s)', step, out_dir)
    print(summary_markdown(done['summary'], done['seconds'], step,
                           false_alarm_voxels(done.get('cases', []))))
    return done['summary']
  pred_dir = os.path.join(out_dir, 'predictions')
  record = {'fingerprint': fp, 'checkpoint_step': step,
            'inputs': {c: v[:2] for c, v in inputs.items()}}
  written = _load_json(os.path.join(pred_dir, 'record.json')) or compat.masks_record(done)
  preds = _written_masks(written, record, prep, cases, pred_dir)
  if preds:
    logging.info('evaluate: the masks of checkpoint step %d stand (%s); scoring them again',
                 step, pred_dir)
  else:
    if distributed.is_main() and os.path.exists(os.path.join(pred_dir, 'record.json')):
      os.remove(os.path.join(pred_dir, 'record.json'))  # the masks are about to change
    preds = masks.predict_cases(config, prep, cases, nets, sliding_window.Predictor(config, mesh),
                                pred_dir, labels)
    if distributed.is_main():
      store_lib.atomic_write_json(os.path.join(pred_dir, 'record.json'), record)
  return _score(config, prep, labels, refs, cases, preds, step, out_dir, t0)


def _written_masks(written: Optional[dict], record: dict, prep, cases: list,
                   pred_dir: str) -> Optional[dict]:
  """{case: (probability on the prepared grid, mask on the original grid)} read back from the
  masks in pred_dir when they were made from the same networks and shards (`written`, their
  record.json, equals `record`: evaluate fingerprint, checkpoint step, prepared and P shard
  identities) and all are there; else None. Ground truth is not in the record: a label added,
  edited or removed re-scores these masks. The probability is the mask itself on the prepared
  grid (pictures only)."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  if written != record:
    return None
  files = {c: os.path.join(pred_dir, f'{c}.nii.gz') for c in cases}
  if not all(os.path.exists(f) for f in files.values()):
    return None
  out = {}
  for c in cases:
    geom = geometry.Geometry.from_json(prep.meta(c)['geometry'])
    mask = np.asarray(nib.load(files[c]).dataobj) > 0
    canon, _, _ = geometry.to_canonical(mask.astype(np.uint8), np.asarray(geom.original_affine))
    out[c] = (geometry.crop_and_resample(canon, geom, order=0).astype(np.float32), mask)
  return out


def _score(config, prep, labels, refs, cases, preds: dict, step, out_dir: str, t0: float):
  """Scores preds ({case: (probability or None, mask on the original grid)}) on the cases with
  ground truth and writes the reports; step None: masks from eval.predictions_dir."""
  external = config.eval.predictions_dir if step is None else None
  rows = {'GMM w/ threshold (P)' if config.pseudo_labels.source == 'gmm'
          else f'P ({config.pseudo_labels.source})': [],
          f'predictions ({external})' if external else 'CGC network': []}
  p_name, n_name = list(rows)
  per_case = []
  p_masks = {}
  p_metrics = references.p_scores(config, prep, labels, refs, cases)
  for c in cases:
    if not refs.is_complete(c):
      continue
    row, mn, mp, p_mask = score_case(config, prep, labels, refs, c, preds[c][1],
                                     p_metrics.get(c))
    rows[n_name].append(mn)
    if mp is not None:
      rows[p_name].append(mp)
      p_masks[c] = p_mask
    per_case.append(row)
  if not per_case:
    logging.info('evaluate: no case has ground truth: masks written, no metrics')
    if os.path.exists(os.path.join(out_dir, 'summary.json')):  # every label removed since
      os.remove(os.path.join(out_dir, 'summary.json'))
    return None
  summaries = {k: metrics.summarise(v) for k, v in rows.items() if v}
  seconds = time.time() - t0
  if distributed.is_main():
    _write_reports(out_dir, per_case, summaries, seconds, step, fingerprints.of(config, 'evaluate'),
                   _inputs(prep, labels, refs, cases) if not external else None)
    if config.eval.pictures and not external:
      from cgc_jax.imaging import overlays  # pylint: disable=g-import-not-at-top
      overlays.write_all(out_dir, prep, refs, cases, {c: v[0] for c, v in preds.items()}, p_masks,
                         per_case, p_name, n_name)
  md = summary_markdown(summaries, seconds, step, false_alarm_voxels(per_case))
  logging.info('evaluation (%d cases with ground truth):\n%s', len(per_case), md)
  print(md)
  return summaries


def is_current(done: Optional[dict], fingerprint: str, step: int, inputs: dict, labelled: list,
               pictures_ok: bool) -> bool:
  """Whether a finished evaluation (`done`: its summary.json, or None) still stands: same config
  fingerprint, checkpoint step and input shards, the same cases with ground truth, and its
  pictures drawn when they are asked for."""
  return bool(done) and done.get('fingerprint') == fingerprint and \
      done.get('checkpoint_step') == step and done.get('inputs') == inputs and \
      sorted(c['case'] for c in done.get('cases', [])) == sorted(labelled) and pictures_ok


def score_case(config, prep: store_lib.Store, labels: store_lib.Store, refs: store_lib.Store,
               case: str, net_mask: np.ndarray, p_metrics: Optional[dict] = None) -> tuple:
  """Scores one case that has ground truth (refs: the reference store), on its original grid.

  net_mask: bool mask on the case's original grid; p_metrics: P's metrics from
  pseudo_labels.p_scores (computed here when None and the case has P). Returns (row, network
  metrics, P metrics or None, P mask on the prepared grid or None): row is the case's line of
  cases.csv (`case`, then `net_<metric>` and, when the case has P, `p_<metric>`).
  """
  meta = prep.meta(case)
  geom = geometry.Geometry.from_json(meta['geometry'])
  ref = geometry.to_original(np.asarray(refs.read(case, 'label_native')), geom.native())
  mn = metrics.all_metrics(net_mask, ref, geom.original_spacing)
  row = {'case': case, **{f'net_{k}': v for k, v in mn.items()}}
  if not labels.is_complete(case):
    return row, mn, None, None
  post = np.asarray(labels.read(case, 'posterior'), np.float32)
  thr = references.p_threshold(config)
  mp = p_metrics or metrics.all_metrics(
      geometry.prob_to_original_mask(post, geom, thr), ref, geom.original_spacing)
  row.update({f'p_{k}': v for k, v in mp.items()})
  return row, mn, mp, post > thr


def _pictures_complete(out_dir: str, cases: list) -> bool:
  """Whether every case has its overlay picture (eval.pictures switched on after a finished run
  makes the evaluation current only once they are drawn)."""
  return all(os.path.exists(os.path.join(out_dir, 'pictures', f'{c}.png')) for c in cases)


def external_masks(folder: str, prep: store_lib.Store, refs: store_lib.Store, cases: list) -> dict:
  """{case: bool mask on the original grid} from folder/<case>.nii.gz for every case with ground
  truth. Raises StageError listing EVERY case whose mask is missing, unreadable, or not on the
  case's original grid (shape, affine): never a silent skip."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  found, missing, wrong = {}, [], []
  for c in cases:
    meta = prep.meta(c)
    if not refs.is_complete(c):
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
      found[c] = mask > 0.5
  if missing or wrong:
    lines = ([f'missing ({len(missing)}): {", ".join(missing)}'] if missing else []) + wrong
    raise errors.StageError(f'{folder}: predictions do not match the cases to evaluate; nothing '
                             'was scored:\n  ' + '\n  '.join(lines))
  return found


def _load_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _inputs(prep: store_lib.Store, labels: store_lib.Store, refs: store_lib.Store,
            cases: list) -> dict:
  """{case: [prepared shard identity, P shard identity or None, reference identity or None]}: a
  redone case re-evaluates; a changed reference only re-scores (_written_masks)."""
  return {c: [prep.identity(c), labels.identity(c) if labels.is_complete(c) else None,
              refs.identity(c) if refs.is_complete(c) else None] for c in cases}


def _fmt(s, k):
  v = s[k]
  return f'{v["mean"]:.4f} +- {v["std"]:.4f}'


def false_alarm_voxels(per_case: list) -> dict:
  """{method: {case: voxels}} on the cases whose ground truth is empty (cases.csv rows: net_* for
  the network, p_* for P)."""
  out = {}
  for prefix, name in (('p_', 'P'), ('net_', 'network')):
    fa = {r['case']: int(r[f'{prefix}pred_voxels']) for r in per_case
          if r.get(f'{prefix}ref_voxels') == 0}
    if fa:
      out[name] = fa
  return out


def summary_markdown(summaries: dict, seconds: float, step: int, false_alarms=None) -> str:
  lines = [
      '| method | cases | Dice | Sensitivity | ASSD [mm] | HD95 [mm] | ASSD NaN | empty pred |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |'
  ]
  for name, s in summaries.items():
    lines.append(f'| {name} | {s["cases"]} | {_fmt(s, "dice")} | {_fmt(s, "sensitivity")} | '
                 f'{_fmt(s, "assd")} | {_fmt(s, "hd95")} | {s["assd"]["nan_cases"]} | '
                 f'{s["empty_pred_cases"]} |')
  source = f'Checkpoint step {step}' if step is not None else 'Masks from eval.predictions_dir'
  lines += ['', f'{source}; evaluation time {seconds:.1f}s.']
  if false_alarms:
    lines += ['', 'Lesion-free cases (empty ground truth): voxels marked as lesion on the original '
              'grid (false alarms), ' + '; '.join(
                  f'{name}: ' + ', '.join(f'{c} {v}' for c, v in fa.items())
                  for name, fa in false_alarms.items())]
  lines += ['', CONVENTIONS]
  return '\n'.join(lines) + '\n'


def _write_reports(out_dir, per_case, summaries, seconds, step, fp, inputs=None):
  os.makedirs(out_dir, exist_ok=True)
  buf = io.StringIO()
  keys = sorted({k for r in per_case for k in r} - {'case'})
  w = csv.DictWriter(buf, ['case'] + keys)
  w.writeheader()
  w.writerows(per_case)
  store_lib.atomic_write_text(os.path.join(out_dir, 'cases.csv'), buf.getvalue())
  store_lib.atomic_write_json(os.path.join(out_dir, 'summary.json'),
                              {'summary': summaries, 'seconds': seconds, 'checkpoint_step': step,
                               'fingerprint': fp, 'inputs': inputs,
                               'conventions': CONVENTIONS, 'cases': per_case})
  store_lib.atomic_write_text(os.path.join(out_dir, 'summary.md'),
                              summary_markdown(summaries, seconds, step,
                                               false_alarm_voxels(per_case)))
