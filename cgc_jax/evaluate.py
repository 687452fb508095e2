"""Evaluate and predict stages: restore a checkpoint, sliding-window inference, masks on the
original grid, per-case metrics with the GMM (P) row beside the network's, summary table and
pictures.

Outputs (WORKDIR/eval/): predictions/<case>.nii.gz (u8, original grid and affine), cases.csv,
summary.json, summary.md, pictures/<case>.png, pictures/dice.png; with eval.predictions_dir, masks
made elsewhere are scored instead (WORKDIR/eval_predictions/). Predict mode writes
WORKDIR/predict/masks/<case>.nii.gz for a folder of new scans (no labels needed).
"""
import csv
import io
import json
import math
import os
import time
from typing import Optional

from absl import logging
import jax
import numpy as np

from cgc_jax import checkpoint
from cgc_jax import distributed
from cgc_jax import errors
from cgc_jax import fingerprints
from cgc_jax import folds as folds_lib
from cgc_jax import geometry
from cgc_jax import gmm
from cgc_jax import metrics
from cgc_jax import morphology
from cgc_jax import nifti
from cgc_jax import paths
from cgc_jax import sliding_window
from cgc_jax import store as store_lib
from cgc_jax import train_state

CONVENTIONS = (
    'Dice and sensitivity on the original grid; ASSD and HD95 in mm (medpy >= 0.5 '
    'definitions: surface = mask minus its 6-connected erosion; ASSD = mean of the '
    'surface distances of both directions pooled). Both masks empty: Dice 1, ASSD 0; '
    'exactly one empty: Dice 0, ASSD NaN (counted in "ASSD NaN", excluded from its mean).')


def restore_params(config, workdir, mesh, num_channels: int):
  """(params, step): the U-Net params of checkpoint config.eval.step (-1: as eval.select says;
  'latest': the newest readable), replicated on `mesh`. eval.average_checkpoints = n > 1: the
  element-wise mean of the params of the n newest kept checkpoints up to that step (fewer when
  fewer are kept, with a warning); `step` is still the newest of them. `workdir`: the folder
  holding checkpoints/ (WORKDIR, or one network's folds.run_dirs folder)."""
  params, step, _ = _restore(config, workdir, mesh, num_channels)
  return params, step


def restore_networks(config, workdir, mesh, num_channels: int):
  """(nets, step): nets = [(params, the cases that network trained on)], one per network of
  train.folds or train.ensemble (one network: [(params, every training case)]), each restored as
  restore_params does; step: the evaluated checkpoint step (a list when the networks' steps
  differ)."""
  nets, steps = [], []
  for d in folds_lib.network_dirs(config, workdir):
    params, step, seen = _restore(config, d, mesh, num_channels)
    nets.append((params, frozenset(seen)))
    steps.append(step)
  return nets, steps[0] if len(set(steps)) == 1 else steps


def _restore(config, workdir, mesh, num_channels: int):
  """restore_params, plus the cases the checkpoint was trained on (its record's P inputs)."""
  tx, _ = train_state.make_optimizer(config.train)
  target = train_state.abstract_state(config, mesh, num_channels, tx)
  ckpt = checkpoint.Checkpointer(paths.checkpoints(workdir), config.train.keep_checkpoints)
  if ckpt.latest_step() is None:
    raise errors.StageError(f'{ckpt.directory}: no checkpoint: run --mode=train first')
  step = None if config.eval.step < 0 else config.eval.step
  if step is None and config.eval.select != 'latest':
    step = selected_step(config, workdir, ckpt.all_steps())
  if step is not None and step not in ckpt.all_steps():
    raise errors.StageError(f'{ckpt.directory}: no checkpoint at step {step} (have '
                             f'{ckpt.all_steps()})')
  state, record, s = ckpt.restore(target, step)
  params = state.params['unet']
  n = int(config.eval.get('average_checkpoints', 0))
  if n > 1:
    steps = [t for t in ckpt.all_steps() if t < s][-(n - 1):]
    if len(steps) < n - 1:
      logging.warning('evaluate: eval.average_checkpoints=%d but only steps %s are kept up to step '
                      '%d: averaging those', n, steps + [s], s)
    for t in steps:  # a running sum of replicated arrays: no host copy, any number of processes
      other = ckpt.restore(target, t)[0].params['unet']
      params = jax.tree.map(lambda a, b: a + b, params, other)
    params = jax.tree.map(lambda a: a / (len(steps) + 1), params)
    logging.info('evaluate: params averaged over checkpoint steps %s', steps + [s])
  ckpt.close()
  diffs = fingerprints.diff(record.get('fields', {}).get('model', {}),
                            fingerprints.fields(config, 'train')['model'])
  if diffs:
    raise checkpoint.IncompatibleCheckpointError(f'{ckpt.directory}: model config differs: {diffs}')
  return params, s, sorted(record.get('inputs') or record.get('cases') or [])


def case_mixture(config, image, brain, geom, modalities, case_id: str, stored=None) -> tuple:
  """What the case's pseudo-label mixture says, where evaluation needs it -> (evidence: bool, p:
  bool[X', Y', Z'], f32[X', Y', Z'] or None).

  evidence: False when the mixture found no lesion evidence (its status 'no_lesion_evidence',
  gmm.min_contrast) and the case-level gate (eval.gate_on_p_evidence) is on; otherwise True.
  p: the case's P on the prepared grid when eval.border_mm > 0 (the border refinement), else None;
  with eval.border_symmetry, f32 with 0.5 (no say: morphology.refine_border) on P's left-right
  symmetric voxels (morphology.case_symmetric_lesion, the voxels training leaves out), 1 on P's
  other lesion voxels, 0 elsewhere.
  stored: (report, p) from the pseudo-label stage when the case has them (p None when not read);
  otherwise (new scans) the mixture consensus is fitted now, as the stage would.
  """
  gmm_source = config.pseudo_labels.source == 'gmm'
  gate = bool(config.eval.gate_on_p_evidence) and gmm_source
  border = config.eval.get('border_mm', 0.0) > 0 and gmm_source
  if not (gate or border):
    return True, None
  report, p = stored if stored is not None else (None, None)
  if report is None or (border and p is None):
    _, p, report = gmm.consensus(np.asarray(image, np.float32), np.asarray(brain) > 0,
                                 list(modalities), config.gmm, case_id, geom.spacing,
                                 gmm.hu_scale(config))
  evidence = not gate or report.get('status') != 'no_lesion_evidence'
  if not border:
    return evidence, None
  p = np.asarray(p) > 0
  if config.eval.get('border_symmetry', False):
    sym = morphology.case_symmetric_lesion(case_id, p, image, brain, modalities, config.train)
    p = np.where(sym, np.float32(0.5), p.astype(np.float32))
  return evidence, p


def segment_prepared(config, predictor, params, image, brain, geom, evidence: bool = True,
                     p=None):
  """One prepared case -> (lesion probability f32[X', Y', Z'] on the prepared grid, inside the brain
  and after the rules of config.eval; mask u8 on the ORIGINAL grid). `params`: one network's, or a
  list of networks' (their probabilities are averaged before the rules).
  evidence=False (the case-level gate said no lesion): an empty mask. p: the case's P (bool, the
  prepared grid; case_mixture) for eval.border_mm: voxels within that many mm of the border of the
  network's mask (after the component rules) take P's side (morphology.refine_border), then the
  component rules run again. The network does not run when evidence is False."""
  if not evidence:
    prob = np.zeros(np.shape(brain), np.float32)
    return prob, geometry.prob_to_original_mask(prob, geom)
  members = params if isinstance(params, list) else [params]
  image = np.asarray(image, np.float32)
  prob = sum(predictor.predict_volume(p_, image) for p_ in members) / len(members)
  prob = prob * (np.asarray(brain) > 0)
  e = config.eval
  rules = lambda q: morphology.filter_components(q, geom.spacing, e.min_component_mm3,
                                                 e.min_component_probability, e.keep_fraction)
  prob = rules(prob)
  if p is not None and e.get('border_mm', 0.0) > 0:
    prob = rules(morphology.refine_border(prob, p, geom.spacing, e.border_mm))
  return prob, geometry.prob_to_original_mask(prob, geom)


def predict_cases(config, prep: store_lib.Store, cases, nets, predictor, out_dir, labels=None):
  """Predicts every case; returns {case: (prob on prepared grid, mask on original grid)}.
  nets: restore_networks' list; a case is segmented by the mean of all of them
  (eval.fold_networks = 'all'), or of those that did not train on it ('unseen': folds.members_for;
  all of them for a new scan).
  labels: the pseudo-label store where the P stage ran (a case's report and P are reused from it;
  case_mixture)."""
  out = {}
  t0 = time.time()
  for i, c in enumerate(cases):
    meta = prep.meta(c)
    geom = geometry.Geometry.from_json(meta['geometry'])
    image = np.asarray(prep.read(c, 'image', config.data.verify_checksums), np.float32)
    brain = np.asarray(prep.read(c, 'brain')) > 0
    stored = None
    if labels is not None and labels.is_complete(c):
      stored = (labels.meta(c)['report'], labels.read(c, 'p', config.data.verify_checksums)
                if config.eval.get('border_mm', 0.0) > 0 else None)
    evidence, p = case_mixture(config, image, brain, geom, meta['modalities'], c, stored)
    members = [params for params, _ in nets]
    if config.eval.get('fold_networks', 'all') == 'unseen':
      members = [nets[i][0] for i in folds_lib.members_for(c, [seen for _, seen in nets])]
    prob, mask = segment_prepared(config, predictor, members, image, brain, geom, evidence, p)
    if distributed.is_main():
      nifti.write_mask(mask, geom, meta, os.path.join(out_dir, f'{c}.nii.gz'))
      if config.eval.get('save_probabilities',
                         False):  # lesion probability on the original grid (0 outside)
        nifti.write_image(geometry.to_original(prob.astype(np.float32), geom, order=1), geom, meta,
                          os.path.join(out_dir, f'{c}_prob.nii.gz'))
    out[c] = (prob, mask)
    el = time.time() - t0
    logging.info('predict: %d/%d cases (%.2f case/s, ETA %.0fs) %s%s', i + 1, len(cases),
                 (i + 1) / el, (len(cases) - i - 1) * el / (i + 1), c,
                 '' if evidence else ' (no lesion evidence: empty mask)')
  return out


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


def evaluate(config, workdir: str):
  """--mode=evaluate on every prepared case (metrics where ground truth exists)."""
  distributed.initialize(config.dist)
  mesh = distributed.mesh()
  t0 = time.time()
  prep = paths.prepared_store(config, workdir)
  labels = paths.pl_store(config, workdir)
  cases = prep.complete_cases()
  if not cases:
    raise errors.StageError(f'{prep.root}: no prepared cases')
  external = config.eval.predictions_dir
  out_dir = os.path.join(workdir, 'eval_predictions' if external else paths.EVAL)
  fp = fingerprints.of(config, 'evaluate')
  if external:  # masks from elsewhere, checked case by case before any metric
    preds = {c: (None, m) for c, m in external_masks(external, prep, cases).items()}
    step = None
  else:
    nch = prep.meta(cases[0])['arrays']['image']['shape'][-1]
    nets, step = restore_networks(config, workdir, mesh, nch)
    done = _load_json(os.path.join(out_dir, 'summary.json'))
    if is_current(done, fp, step, _inputs(prep, labels, cases),
                  [c for c in cases if prep.meta(c)['has_label']],
                  not config.eval.pictures or _pictures_complete(out_dir, cases)):
      logging.info('evaluate: up to date for checkpoint step %d (%s)', step, out_dir)
      print(summary_markdown(done['summary'], done['seconds'], step,
                             false_alarm_voxels(done.get('cases', []))))
      return done['summary']
    predictor = sliding_window.Predictor(config, mesh)
    preds = predict_cases(config, prep, cases, nets, predictor,
                          os.path.join(out_dir, 'predictions'), labels)
  rows = {'GMM w/ threshold (P)' if config.pseudo_labels.source == 'gmm'
          else f'P ({config.pseudo_labels.source})': [],
          f'predictions ({external})' if external else 'CGC network': []}
  p_name, n_name = list(rows)
  per_case = []
  p_masks = {}
  for c in cases:
    if not prep.meta(c)['has_label']:
      continue
    row, mn, mp, p_mask = score_case(config, prep, labels, c, preds[c][1])
    rows[n_name].append(mn)
    if mp is not None:
      rows[p_name].append(mp)
      p_masks[c] = p_mask
    per_case.append(row)
  if not per_case:
    logging.info('evaluate: no case has ground truth: masks written, no metrics')
    return None
  summaries = {k: metrics.summarise(v) for k, v in rows.items() if v}
  seconds = time.time() - t0
  if distributed.is_main():
    _write_reports(out_dir, per_case, summaries, seconds, step, fp,
                   _inputs(prep, labels, cases) if not external else None)
    if config.eval.pictures and not external:
      from cgc_jax import overlays  # pylint: disable=g-import-not-at-top
      overlays.write_all(out_dir, prep, cases, {c: v[0] for c, v in preds.items()}, p_masks,
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


def score_case(config, prep: store_lib.Store, labels: store_lib.Store, case: str,
               net_mask: np.ndarray) -> tuple:
  """Scores one case that has ground truth, on its original grid.

  net_mask: bool mask on the case's original grid. Returns (row, network metrics, P metrics or
  None, P mask on the prepared grid or None): row is the case's line of cases.csv (`case`, then
  `net_<metric>` and, when the case has P, `p_<metric>`). P's metrics are the ones the pseudo-label
  stage stored for this same posterior on this same grid, computed here only when absent.
  """
  meta = prep.meta(case)
  geom = geometry.Geometry.from_json(meta['geometry'])
  ref = geometry.to_original(np.asarray(prep.read(case, 'label_native')), geom.native())
  mn = metrics.all_metrics(net_mask, ref, geom.original_spacing)
  row = {'case': case, **{f'net_{k}': v for k, v in mn.items()}}
  if not labels.is_complete(case):
    return row, mn, None, None
  post = np.asarray(labels.read(case, 'posterior'), np.float32)
  thr = config.gmm.threshold if config.pseudo_labels.source == 'gmm' else 0.5
  mp = labels.meta(case)['report'].get('metrics') or metrics.all_metrics(
      geometry.prob_to_original_mask(post, geom, thr), ref, geom.original_spacing)
  row.update({f'p_{k}': v for k, v in mp.items()})
  return row, mn, mp, post > thr


def _pictures_complete(out_dir: str, cases: list) -> bool:
  """Whether every case has its overlay picture (eval.pictures switched on after a finished run
  makes the evaluation current only once they are drawn)."""
  return all(os.path.exists(os.path.join(out_dir, 'pictures', f'{c}.png')) for c in cases)


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
    raise errors.StageError(f'{folder}: predictions do not match the cases to evaluate; nothing '
                             'was scored:\n  ' + '\n  '.join(lines))
  return masks


def _load_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _inputs(prep: store_lib.Store, labels: store_lib.Store, cases: list) -> dict:
  """{case: [prepared shard identity, P shard identity or None]}: a redone case re-evaluates."""
  return {c: [prep.identity(c), labels.identity(c) if labels.is_complete(c) else None]
          for c in cases}


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


def predict(config, workdir: str, store: store_lib.Store, cases: list) -> str:
  """--mode=predict on new scans already prepared into `store` (the pipeline prepares them from
  eval.input_root): masks on their own grids, optional probability maps and overlay pictures.
  Returns the output folder."""
  distributed.initialize(config.dist)
  mesh = distributed.mesh()
  out_dir = paths.predict_output(config, workdir)
  if cases:
    nch = store.meta(cases[0])['arrays']['image']['shape'][-1]
    nets, step = restore_networks(config, workdir, mesh, nch)
    predictor = sliding_window.Predictor(config, mesh)
    preds = predict_cases(config, store, cases, nets, predictor, out_dir)
    if distributed.is_main() and config.eval.pictures:
      from cgc_jax import overlays  # pylint: disable=g-import-not-at-top  (matplotlib)
      overlays.write_predictions(out_dir, store, cases, {c: v[0] for c, v in preds.items()})
    logging.info('predict: %d masks from checkpoint step %s in %s', len(cases), step, out_dir)
  return out_dir


# eval.select: label-free checkpoint choice from train/track.jsonl (signal -> better is max | min).
SELECT_RULES = {'flip_agreement': 'max', 'confident_ce': 'min', 'p_agreement': 'min'}


def read_track(workdir: str) -> list:
  """train/track.jsonl rows sorted by step (read_step_rows)."""
  return read_step_rows(paths.track_file(workdir))


def read_step_rows(path: str) -> list:
  """A JSON-lines log's rows sorted by step (a resumed run's repeated steps: the last row wins; a
  line cut by a kill mid-append is skipped with a warning); [] when there is no such file."""
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for i, line in enumerate(f):
      if line.strip():
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          logging.warning('%s: line %d is not JSON (cut by a kill?): skipped', path, i + 1)
          continue
        rows[r['step']] = r
  return [rows[k] for k in sorted(rows)]


def pick(track: list, signal=None) -> dict:
  """The track row a label-free rule keeps: best `signal` per SELECT_RULES (ties: the earliest
  step); signal None, or no finite value: the last row."""
  ok = [r for r in track if signal and math.isfinite(r.get(signal, float('nan')))]
  if not ok:
    return track[-1]
  v = (max if SELECT_RULES[signal] == 'max' else min)(r[signal] for r in ok)
  return next(r for r in ok if r[signal] == v)


def selected_step(config, workdir, steps: list) -> int:
  """The checkpointed step that eval.select's label-free signal prefers (no ground truth used)."""
  rule = config.eval.select
  if rule not in SELECT_RULES:
    raise errors.StageError(
        f'eval.select={rule!r}: expected latest or one of {sorted(SELECT_RULES)}')
  track = [r for r in read_track(workdir) if r['step'] in steps]
  if not track:
    raise errors.StageError(
        f'eval.select={rule}: no train/track.jsonl row at a kept checkpoint (steps {steps}) in '
        f'{workdir}: train with eval.every_steps a multiple of train.checkpoint_every and '
        'train.keep_checkpoints >= train.steps / train.checkpoint_every')
  row = pick(track, rule)
  logging.info('evaluate: eval.select=%s keeps step %d (%s %.4f; candidates %s)', rule, row['step'],
               rule, row[rule], {r['step']: round(r[rule], 4) for r in track})
  return row['step']


def _nanmean(values) -> float:
  v = np.asarray(values, np.float64)
  return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float('nan')


def tracking_signals(prob: np.ndarray, mirrored: np.ndarray, posterior: np.ndarray,
                     brain: np.ndarray, confident: float,
                     label: Optional[np.ndarray] = None) -> dict:
  """One case's label-free signals (see track_during_training) and, given a label, its Dice.

  prob, mirrored: [X,Y,Z] f32 lesion probability of the scan and of its left-right mirror image
  (mirrored back), both zero outside the brain; posterior: [X,Y,Z] f32 P's lesion posterior; brain,
  label: [X,Y,Z] bool. Masks are probability > 0.5.
  """
  eps = 1e-6
  mask, pmask, flip = prob > 0.5, posterior > 0.5, mirrored > 0.5
  q = np.clip(prob, eps, 1 - eps)
  pos, neg = brain & (posterior >= 1 - confident), brain & (posterior <= confident)
  terms = [float(-np.log(1 - q[neg]).mean())] if neg.any() else []
  if pos.any():
    terms.append(float(-np.log(q[pos]).mean()))
  # both masks empty: no evidence either way (an empty mask is perfectly flip-consistent, and a
  # network that predicts nothing would otherwise score best): NaN, left out of the mean
  r = {'flip_agreement': metrics.dice(mask, flip) if mask.any() or flip.any() else float('nan'),
       'p_agreement': metrics.dice(mask, pmask),
       'confident_ce': float(np.mean(terms)) if terms else float('nan')}
  if label is not None:
    r['dice'] = metrics.dice(mask, label)
  return r


def tracking_means(rows: dict) -> dict:
  """{signal: mean over cases, NaN left out} of {case: tracking_signals(...)}; a signal no case has
  (dice without labels) is absent."""
  return {k: _nanmean([r[k] for r in rows.values() if k in r])
          for k in ('flip_agreement', 'p_agreement', 'confident_ce', 'dice')
          if any(k in r for r in rows.values())}


def track_during_training(config, workdir, mesh):
  """Returns f(params, step) that appends one row to WORKDIR/train/track.jsonl: per case and as a
  mean, the label-free signals and, where ground truth exists, Dice (analysis only: ground truth
  never feeds training or checkpoint choice).

  Label-free signals (every prepared case; net mask = lesion probability > 0.5 inside the brain, no
  TTA, on the prepared grid):
    flip_agreement: Dice between the net mask and the mask predicted from the left-right mirrored
      scan, mirrored back (augmentation consistency); NaN when both are empty (means skip it).
    p_agreement: Dice between the net mask and P.
    confident_ce: binary cross-entropy of the net probability against P on P's confident voxels
      (posterior >= 1 - eval.confident or <= eval.confident, brain only), lesion and normal voxels
      weighted equally (a case without confident lesion voxels: the normal term alone).
  """
  prep = paths.prepared_store(config, workdir)
  labels = paths.pl_store(config, workdir)
  cases = [c for c in prep.complete_cases() if labels.is_complete(c)]
  if not cases:
    return None
  cfg = config.copy_and_resolve_references()
  cfg.eval.tta_flip = False
  predictor = sliding_window.Predictor(cfg, mesh)
  path = paths.track_file(workdir)
  conf = config.eval.confident

  def f(params, step):
    rows = {}
    for c in cases:
      image = np.asarray(prep.read(c, 'image'), np.float32)
      brain = np.asarray(prep.read(c, 'brain')) > 0
      prob = predictor.predict_volume(params['unet'], image) * brain
      mirrored = predictor.predict_volume(params['unet'], image[::-1])[::-1] * brain
      post = np.asarray(labels.read(c, 'posterior'), np.float32)
      label = np.asarray(prep.read(c, 'label')) > 0 if prep.meta(c)['has_label'] else None
      rows[c] = tracking_signals(prob, mirrored, post, brain, conf, label)
    means = tracking_means(rows)
    logging.info('step %d: %s', step, ', '.join(
        f'{k} {v:.4f}' + (' (ground truth, analysis only)' if k == 'dice' else '')
        for k, v in means.items()))
    if distributed.is_main():
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'a') as fh:
        fh.write(json.dumps({'step': step, **means, 'cases': rows}) + '\n')
    return means
  return f
