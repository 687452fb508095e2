"""The train stage: every network of the run (one, cross-fitting folds, or an ensemble) trained by
training.step's jitted step on a device mesh, with orbax checkpoints and exact resume.
"""
import json
import math
import os
import signal
import time
from typing import Optional

from absl import logging
import jax

from cgc_jax import errors
from cgc_jax.core import compat
from cgc_jax.core import fingerprints
from cgc_jax.core import folds as folds_lib
from cgc_jax.core import paths
from cgc_jax.inference import sliding_window
from cgc_jax.labels import quality
from cgc_jax.model import checkpoint
from cgc_jax.model import train_state
from cgc_jax.model import unet
from cgc_jax.runtime import distributed
from cgc_jax.training import device_crops
from cgc_jax.training import guide as guide_lib
from cgc_jax.training import input_pipeline
from cgc_jax.training import run_log
from cgc_jax.training import step as step_lib


Preempted = errors.Preempted  # defined in errors.py (every user-facing error in one place)


NonFiniteError = errors.NonFiniteError  # defined in errors.py, with every user-facing error


def _record(config, step, sampler, inputs, guide_id=None):
  out = {'fields': fingerprints.fields(config, 'train'), 'data_step': int(step),
         'cases': sampler.case_ids, 'inputs': inputs,
         'config': json.loads(config.to_json_best_effort()), 'convolution': convolution(config)}
  if guide_id is not None:  # train.ensemble_guide: the network-0 masks this network learned from
    out['guide'] = guide_id
  return out


def convolution(config) -> str:
  """The convolution this run's steps use, as recorded with each checkpoint: 'onednn on cpu x 1'
  (model.conv_impl resolved for this backend and device count)."""
  return (f'{unet.resolve_conv_impl(config.model.conv_impl)} on {jax.default_backend()} x '
          f'{jax.device_count()}')


def convolution_change(record: dict, config) -> Optional[str]:
  """A warning when a checkpoint was trained with other convolutions than this run's (same maths,
  other rounding: the resumed run is not bit for bit the uninterrupted one), else None. Checkpoints
  from before the record held it: None."""
  before, now = record.get('convolution'), convolution(config)
  if before is None or before == now:
    return None
  return (f'train: resuming with convolutions {now!r}; the checkpoint was trained with {before!r}:'
          ' the same maths with other rounding, so the resumed run will not match an '
          'uninterrupted one bit for bit')


def accept_legacy(recorded: Optional[dict], inputs: dict, labels) -> dict:
  """`inputs` (case -> P shard identity) with each case whose checkpoint recorded the same shard
  by the earlier identity formula (store.Store.legacy_identity) given that recorded value."""
  return compat.checkpoint_inputs(recorded, inputs, labels.legacy_identity)


def stale_reasons(record: dict, config, inputs: dict, guide_id=None) -> list:
  """Why checkpoints with `record` cannot be continued by this run: the differing train fields,
  the cases whose pseudo-labels (`inputs`: case -> P shard identity) changed since, and (an
  ensemble's guided network) another network 0 than the one it learned from. [] = current."""
  out = fingerprints.diff(record.get('fields', {}), fingerprints.fields(config, 'train'))
  if record.get('guide') != guide_id:
    out.append(f'the ensemble\'s guide (network 0\'s masks) changed since: {record.get("guide")} '
               f'-> {guide_id}')
  old = record.get('inputs')
  if old is not None and old != inputs:
    changed = sorted(c for c in set(old) | set(inputs) if old.get(c) != inputs.get(c))
    out.append(f'pseudo-labels of {len(changed)} case(s) changed since: ' + ', '.join(changed[:5]) +
               (' ...' if len(changed) > 5 else ''))
  return out


def _set_aside(workdir: str, reasons: list, barrier_timeout_s: float) -> str:
  """Moves stale checkpoints and training logs to WORKDIR/stale-<time>/ (process 0; kept, not
  deleted), so that training starts over."""
  dest = os.path.join(workdir, 'stale-' + time.strftime('%Y%m%d-%H%M%S'))
  if distributed.is_main():
    os.makedirs(dest, exist_ok=True)
    for d in (paths.CHECKPOINTS, paths.TRAIN):
      if os.path.exists(os.path.join(workdir, d)):
        os.replace(os.path.join(workdir, d), os.path.join(dest, d))
    logging.warning(
        'train: the checkpoints are stale, training starts over (the old run is kept in '
        '%s):\n  %s', dest, '\n  '.join(reasons))
  distributed.sync('train-set-aside', '', barrier_timeout_s)
  return dest


class _Sigterm:
  def __init__(self):
    self.hit = False
    self.prev = None

  def __enter__(self):
    try:
      self.prev = signal.signal(signal.SIGTERM, self._on)
    except ValueError:  # not the main thread
      self.prev = None
    return self

  def _on(self, *_):
    self.hit = True

  def __exit__(self, *_):
    if self.prev is not None:
      signal.signal(signal.SIGTERM, self.prev)


def train_and_evaluate(config, workdir: str, periodic_eval=None) -> train_state.TrainState:
  """Trains to config.train.steps, resuming from the newest checkpoint. Returns the final state.
  train.folds = n >= 2: n networks one after another, network f on every case not in fold f, in
  WORKDIR/folds/<f>/; train.ensemble = k >= 2: k networks on every case, network m with seed
  train.seed + 1000 m, in WORKDIR (m = 0) and WORKDIR/ensemble/<m> (folds.py). The state returned
  is the last network's."""
  distributed.initialize(config.dist)
  tcfg = config.train
  if tcfg.batch_size % jax.device_count():
    raise errors.StageError(f'train.batch_size {tcfg.batch_size} is not divisible by the '
                             f'{jax.device_count()} devices')
  prep = paths.prepared_store(config, workdir)
  labels = paths.pl_store(config, workdir)
  cases = [c for c in labels.complete_cases() if prep.is_complete(c)]
  if not cases:
    raise errors.StageError(f'{labels.root}: no pseudo-labels: run --mode=pseudo_labels first')
  n = int(tcfg.get('folds', 1))
  if n > 1 and len(cases) < n:
    raise errors.StageError(f'{labels.root}: train.folds={n} needs at least {n} cases with '
                            f'pseudo-labels, found {len(cases)}')
  state, guide_of = None, None
  dirs = folds_lib.network_dirs(config, workdir)
  for f, run_dir in enumerate(dirs):
    net_config = folds_lib.network_config(config, f)
    if n > 1:
      logging.info('train: network %d of %d (cross-fitting: fold %d left out), in %s', f + 1, n,
                   f, run_dir)
    elif len(dirs) > 1:
      if f == 1 and tcfg.get('ensemble_guide', 'none') != 'none':
        guide_of = _guide(config, workdir, cases, prep, labels, state)
      logging.info('train: network %d of %d (ensemble: seed %d%s), in %s', f + 1, len(dirs),
                   net_config.train.seed, f', guided by network 0\'s {tcfg.ensemble_guide}'
                   if f and guide_of else '', run_dir)
    state = _train_network(net_config, run_dir, folds_lib.training_cases(cases, f, n), prep,
                           labels, periodic_eval, guide_of if f else None)
  return state


def _guide(config, workdir, cases, prep, labels, state0):
  """(guide identity, {case: (network 0's mask, its agreement with P)}) for the ensemble's networks
  m >= 1 (train.ensemble_guide; training/guide.py), from network 0's final params (state0)."""
  net0 = folds_lib.network_config(config, 0)
  step = int(jax.device_get(state0.step))
  params = state0.params['unet']

  def make_predict():
    predictor = sliding_window.Predictor(net0, distributed.mesh())
    return lambda image: predictor.predict_volume(params, image)

  masks = guide_lib.first_network_masks(net0, guide_lib.guide_root(workdir), step, make_predict,
                                        cases, prep, labels)
  logging.info('train: network 0 agrees with P at %s', ', '.join(
      f'{c} {a:.3f}' for c, (_, a) in sorted(masks.items())))
  return guide_lib.identity(net0, step), masks


def _train_network(config, run_dir, cases, prep, labels, periodic_eval, guide=None):
  """Trains one network on `cases`, its checkpoints and logs in `run_dir` (WORKDIR, or a fold's
  folder), resuming from its newest checkpoint. guide: _guide's (identity, masks) for an ensemble's
  network m >= 1 under train.ensemble_guide, else None."""
  mesh = distributed.mesh()
  tcfg = config.train
  weights, guide_id, guide_masks = None, None, None
  if tcfg.get('quality_weight', 0.0) > 0:
    weights = quality.case_weights(quality.pseudo_label_signals(config, prep, labels, cases),
                                   tcfg.quality_weight)
    logging.info('train: case weights from the quality of P (train.quality_weight %.2f): %s',
                 tcfg.quality_weight, ', '.join(f'{c} {w:.2f}' for c, w in sorted(weights.items())))
  if guide is not None:
    guide_id, masks = guide
    if tcfg.ensemble_guide == 'cases':
      ranked = guide_lib.case_weights({c: a for c, (_, a) in masks.items() if c in cases})
      weights = {c: ranked[c] * (weights or {}).get(c, 1.0) for c in ranked}
      logging.info('train: case weights from network 0\'s agreement with P: %s',
                   ', '.join(f'{c} {w:.2f}' for c, w in sorted(weights.items())))
    else:
      guide_masks = {c: m for c, (m, _) in masks.items()}
  sampler = input_pipeline.CropSampler(prep, labels, cases, tcfg, config.data.verify_checksums,
                                       jax.process_index(), jax.process_count(), weights,
                                       guide_masks)
  num_channels = sampler.num_channels
  tx, sched = train_state.make_optimizer(tcfg)
  inputs = {c: labels.identity(c) for c in cases}
  ckpt = checkpoint.Checkpointer(paths.checkpoints(run_dir), tcfg.keep_checkpoints)
  start = 0
  if ckpt.latest_step() is not None and tcfg.restart_when_stale:
    record = ckpt.record(ckpt.latest_step())
    reasons = stale_reasons(record, config, accept_legacy(record.get('inputs'), inputs, labels),
                            guide_id)
    if reasons:
      ckpt.close()
      _set_aside(run_dir, reasons, config.dist.barrier_timeout_s)
      ckpt = checkpoint.Checkpointer(paths.checkpoints(run_dir), tcfg.keep_checkpoints)
  if ckpt.latest_step() is not None:
    # the config first: a different model would otherwise fail as a shape mismatch inside orbax
    checkpoint.check_compatible(ckpt.record(ckpt.latest_step()), config, ckpt.directory)
    state, record, start = ckpt.restore(train_state.abstract_state(config, mesh, num_channels, tx))
    checkpoint.check_compatible(record, config, ckpt.directory)
    logging.info('train: resumed from step %d', start)
    change = convolution_change(record, config)
    if change:
      logging.warning('%s', change)
  else:
    state = train_state.create_state(config, mesh, num_channels, tx)
  if start >= tcfg.steps:
    logging.info('train: already finished (%d steps); nothing to do', start)
    ckpt.close()
    return state
  step_fn = step_lib.make_train_step(config, mesh, tx)
  data = distributed.data_sharding(mesh)
  voxels = tcfg.batch_size * math.prod(tcfg.crop)
  log = run_log.RunLog(run_dir, start) if distributed.is_main() else None
  t0, t_last, s_last = time.time(), time.time(), start
  logging.info('train: %d cases, steps %d -> %d, global batch %d of %s on %d devices', len(cases),
               start, tcfg.steps, tcfg.batch_size, tuple(tcfg.crop), jax.device_count())
  on_device, why = device_crops.choose(sampler)
  logging.info('train: crops cut on the %s (%s)', 'devices' if on_device else 'host', why)
  if on_device:
    batches = device_crops.DeviceCrops(sampler, mesh).iterate(start, tcfg.steps)
  else:
    batches = ((step, distributed.global_batch(local, data))
               for step, local in sampler.iterate(start, tcfg.steps))
  try:
    with _Sigterm() as term:
      for step, batch in batches:
        state, metrics = step_fn(state, batch)
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        done = step + 1
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:
          ckpt.wait()
          raise NonFiniteError(f'step {done}: non-finite {bad} (values {m}); batch cases '
                               f'{sampler.case_ids_of(step)}; last good checkpoint: step '
                               f'{ckpt.latest_step()}')
        if done % tcfg.log_every == 0 or done == tcfg.steps:
          now = time.time()
          rate = (done - s_last) / max(now - t_last, 1e-9)
          t_last, s_last = now, done
          m['lr'] = float(sched(done - 1))
          if log:
            log.write(done, dict(time=now - t0, **m))
          logging.info('train step %d/%d: loss %.4f (seg %.4f%s%s) | %.2f steps/s, %.2e voxels/s, '
                       'ETA %.0fs', done, tcfg.steps, m['loss'], m['seg'],
                       f', coarse {m["coarse"]:.4f}' if 'coarse' in m else '',
                       f', fine {m["fine"]:.4f} (floor {m["fine_floor"]:.4f})' if 'fine' in m else
                       '', rate, rate * voxels,
                       (tcfg.steps - done) / max(rate, 1e-9))
        if done % tcfg.checkpoint_every == 0 or done == tcfg.steps or term.hit:
          ckpt.save(done, state, _record(config, done, sampler, inputs, guide_id))
        every = config.eval.every_steps
        if periodic_eval is not None and every and done % every == 0:
          means = periodic_eval(state.params, done)
          if log:
            log.track(done, means)
        if term.hit:
          raise Preempted(f'SIGTERM: saved step {done}; re-run the same command to continue')
  finally:  # whatever ends the loop, saves already started are committed
    ckpt.wait()
    ckpt.close()
    if log:
      log.close()
  logging.info('train: finished %d steps in %.1fs', tcfg.steps, time.time() - t0)
  return state
