"""What training tracks without labels, and the checkpoint it chooses: the label-free signals of
each case (flip agreement, agreement with P, cross-entropy on P's confident voxels) logged to
WORKDIR/train/track.jsonl along training, and eval.select's pick among the kept checkpoints."""
import json
import math
import os
from typing import Optional

from absl import logging
import numpy as np

from cgc_jax import errors
from cgc_jax.core import paths
from cgc_jax.imaging import metrics
from cgc_jax.inference import sliding_window
from cgc_jax.runtime import distributed


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
  refs = paths.reference_store(config, workdir)  # ground truth: the analysis Dice only
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
      label = np.asarray(refs.read(c, 'label')) > 0 if refs.is_complete(c) else None
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
