"""Runs the experiment tables (studies.tables) on one workdir whose offline stages they share.

    python -m cgc_jax.studies.experiments --config=configs/demo.py --workdir=runs/demo \
        --table=methods

Tables: studies.tables.TABLE_NAMES (rows in studies.tables.TABLES). The prepare stage
runs once in --workdir; each pseudo-label source runs once (WORKDIR/experiments/p_<source>/); each
trained configuration and seed runs once, in WORKDIR/experiments/runs/<train fingerprint>/ (linking
to those shared stages; train + evaluate), and every table row that names it links there
(WORKDIR/experiments/<table>/<row>/seed<s>): the full CGC run of `methods` is the tau = 0.2 row of
`temperature`, and an interrupted table resumes where it stopped. A row's eval.* switches train
nothing: the networks of its other switches are evaluated again, in
WORKDIR/experiments/evals/<train fingerprint>_<evaluate fingerprint>/. Every trained run tracks the
label-free signals and Dice along training (eval.every_steps, `--track_every`). Writes
WORKDIR/experiments/<table>.{md,json}: mean +- std over cases (pooled over seeds) of Dice,
sensitivity and ASSD, the std of the per-seed mean Dice across seeds, run time, and the selection
protocol's paired comparison of every row with the first (studies.protocol); `length` writes
Dice and the signals against steps and scores the label-free stopping rules (tables.STOP_RULES) on
every tracked run.
"""
import json
import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags

from cgc_jax import errors
from cgc_jax import pipeline
from cgc_jax.core import config_rules
from cgc_jax.core import folds as folds_lib
from cgc_jax.core import paths
from cgc_jax.imaging import metrics
from cgc_jax.inference import tracking
from cgc_jax.studies import reports
from cgc_jax.studies import tables

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'configs/*.py file', lock_config=False)
flags.DEFINE_string('workdir', None, 'base workdir (its prepared data are shared by every row)')
flags.DEFINE_enum('table', 'methods', list(tables.TABLE_NAMES), 'which table')
flags.DEFINE_string('channels', '', 'pseudo_labels table: extra rows with these GMM channel sets, '
                    '";"-separated, e.g. "flair,t1;flair,t1,t2"')
flags.DEFINE_string('seeds', '0,1', 'training seeds, comma separated')
flags.DEFINE_string('rows', '', 'only these rows of the table (1-based, comma separated; '
                    'default all): a table on a budget, resumable row by row')
flags.DEFINE_integer('track_every', -1, 'eval.every_steps of every trained run '
                     '(-1: train.steps // 6; 0: no tracking)')
flags.DEFINE_bool('verbose', False, 'Show Python tracebacks for data and stage errors.')
flags.mark_flags_as_required(['config', 'workdir'])

def _apply(config, overrides: dict):
  """config with a row's overrides (tables.Patch and tables.Times resolved)."""
  c = config.copy_and_resolve_references()
  bottleneck = [s // 2**(c.model.levels - 1) for s in c.train.crop]
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = tables.resolve(value, c[section].get(field), bottleneck)
  return c


def _link(src, dst):
  """dst -> src (absolute). A link to elsewhere is replaced, atomically: a table row whose
  configuration changed since (a default changed in the config) then names its new run."""
  src = os.path.abspath(src)
  if not os.path.lexists(dst):
    os.symlink(src, dst)
  elif os.path.islink(dst) and os.readlink(dst) != src:
    tmp = f'{dst}.relink'
    if os.path.lexists(tmp):
      os.remove(tmp)
    os.symlink(src, tmp)
    os.replace(tmp, dst)


def p_workdir(config, base: str, source: str, p_overrides=None) -> str:
  """The workdir whose pseudo_labels/ holds P from `source` (with `p_overrides` of the gmm fields),
  sharing the base's prepared data; overrides of data fields (how the scans are prepared) prepare
  the cases again in the row's own workdir."""
  from cgc_jax.core import fingerprints  # pylint: disable=g-import-not-at-top
  config = _apply(config, p_overrides or {})
  config.pseudo_labels.source = source
  own_data = any(k.startswith('data.') for k in (p_overrides or {}))
  if source == 'gmm' and not p_overrides:
    wd = base
  else:
    name = f'p_{source}' if not p_overrides else \
        f'p_{source}_{fingerprints.of(config, "pseudo_labels")}'
    wd = os.path.join(base, 'experiments', name)
    os.makedirs(wd, exist_ok=True)
    shared = ('phantoms',) if own_data else ('prepared', paths.REFERENCES, 'phantoms')
    for d in shared:
      if os.path.exists(os.path.join(base, d)):
        _link(os.path.join(base, d), os.path.join(wd, d))
  if own_data:
    pipeline.run(config, wd, 'prepare')
  pipeline.run(config, wd, 'pseudo_labels')
  return wd


def _p_rows(wd) -> list:
  with open(os.path.join(wd, 'pseudo_labels', 'summary.json')) as f:
    return json.load(f)['rows']


def _row_summary(per_seed: dict, seconds: float) -> dict:
  """per_seed: {seed: [per-case metric rows]} -> pooled mean/std and std of seed means."""
  pooled = [r for rows in per_seed.values() for r in rows]
  s = metrics.summarise(pooled, ('dice', 'sensitivity', 'assd'))
  means = [float(np.mean([r['dice'] for r in rows])) for rows in per_seed.values()]
  s['dice_seed_means'] = means
  s['dice_std_across_seeds'] = float(np.std(means)) if len(means) > 1 else float('nan')
  s['seeds'] = sorted(per_seed)
  s['seconds'] = seconds
  s['per_case_seeds'] = {seed: {r['case']: r['dice'] for r in rows if 'case' in r}
                         for seed, rows in per_seed.items()}
  return s


def term_gaps(wd: str) -> dict:
  """How much of each CGC term is left to learn over the last quarter of a run's logged steps:
  {'fine_above_floor': mean of fine - fine_floor, 'coarse': mean coarse loss}, the keys present
  where the run logged them (runs before the floor was logged have no fine_above_floor). ~0 means
  the term gives the encoder no gradient."""
  rows = tracking.read_step_rows(paths.metrics_file(wd))
  rows = rows[len(rows) - max(1, len(rows) // 4):] if rows else []
  out = {}
  gaps = [r['fine'] - r['fine_floor'] for r in rows if 'fine' in r and 'fine_floor' in r]
  if gaps:
    out['fine_above_floor'] = float(np.mean(gaps))
  coarse = [r['coarse'] for r in rows if 'coarse' in r]
  if coarse:
    out['coarse'] = float(np.mean(coarse))
  return out


def run_dir(base: str, config) -> str:
  """The one workdir of a trained configuration (any table, any row name)."""
  from cgc_jax.core import fingerprints  # pylint: disable=g-import-not-at-top
  return os.path.join(base, 'experiments', 'runs', fingerprints.of(config, 'train'))


def _evaluate_run(c, trained_config, trained: str, base: str) -> str:
  """Evaluates config `c`, which differs from `trained_config` (the run in workdir `trained`) in
  eval.* fields only, on that run's networks, in a workdir of its own
  (WORKDIR/experiments/evals/<train fingerprint>_<evaluate fingerprint>/) that links the run's
  stages, so one network holds any number of evaluations. Returns that workdir, or `trained` when
  the evaluation is the run's own."""
  from cgc_jax.core import fingerprints  # pylint: disable=g-import-not-at-top
  fp = fingerprints.of(c, 'evaluate')
  if fp == fingerprints.of(trained_config, 'evaluate'):
    return trained
  wd = os.path.join(base, 'experiments', 'evals', f'{fingerprints.of(c, "train")}_{fp}')
  os.makedirs(wd, exist_ok=True)
  for d in ('prepared', paths.REFERENCES, 'phantoms', 'pseudo_labels', paths.CHECKPOINTS,
            paths.TRAIN, folds_lib.FOLDS, folds_lib.ENSEMBLE):
    if os.path.exists(os.path.join(trained, d)):
      _link(os.path.join(trained, d), os.path.join(wd, d))
  logging.info('experiments: evaluating the networks of %s in %s', trained, wd)
  pipeline.run(c, wd, 'evaluate')
  return wd


def _train_run(c, base: str, pwd: str) -> str:
  """Trains and evaluates config `c` on the pseudo-labels of workdir `pwd`; returns its workdir."""
  wd = run_dir(base, c)
  os.makedirs(wd, exist_ok=True)
  for d in ('prepared', paths.REFERENCES, 'phantoms', 'pseudo_labels'):
    if os.path.exists(os.path.join(pwd, d)):
      _link(os.path.join(pwd, d), os.path.join(wd, d))
  _share_network0(c, base, wd)
  logging.info('experiments: training %s (P from %s, seed %s)', wd, c.pseudo_labels.source,
               c.train.seed)
  pipeline.run(c, wd, 'all')
  if not os.path.exists(os.path.join(wd, paths.EVAL, 'summary.json')):  # train saved and stopped
    raise errors.Preempted(f'experiments: SIGTERM while training {wd}: its state is saved; re-run '
                           'the same command to continue the table')
  return wd


def _share_network0(c, base: str, wd: str):
  """A guided ensemble (train.ensemble_guide) trains its network 0 exactly as the unguided
  ensemble does (folds.network_config): where that run exists and `wd` has no checkpoints yet,
  its network 0 (checkpoints/ and train/) is copied in, so the row trains only the guided networks
  (the train stage checks the copy against this config and P, as any resume)."""
  if int(c.train.get('ensemble', 1)) < 2 or c.train.get('ensemble_guide', 'none') == 'none':
    return
  plain = c.copy_and_resolve_references()
  plain.train.ensemble_guide = 'none'
  src = run_dir(base, plain)
  if os.path.isdir(paths.checkpoints(src)) and not os.path.exists(paths.checkpoints(wd)):
    for d in (paths.CHECKPOINTS, paths.TRAIN):
      if os.path.isdir(os.path.join(src, d)):
        shutil.copytree(os.path.join(src, d), os.path.join(wd, d))
    logging.info('experiments: network 0 of %s copied from the unguided ensemble %s', wd, src)


def score_rules(tracks: list) -> dict:
  """tracks: per run, its track rows with 'dice'. -> per rule: mean chosen step, mean Dice at it,
  mean oracle (best-step) Dice, mean gap to the oracle, runs within 0.01 of the oracle."""
  tracks = [t for t in tracks if t and all('dice' in r for r in t)]
  out = {}
  for name, signal in tables.STOP_RULES:
    chosen = [t[0] if signal == 'first' else tracking.pick(t, signal) for t in tracks]
    best = [max(r['dice'] for r in t) for t in tracks]
    gaps = [b - c['dice'] for b, c in zip(best, chosen)]
    out[name] = {'runs': len(tracks), 'step': float(np.mean([c['step'] for c in chosen])),
                 'dice': float(np.mean([c['dice'] for c in chosen])),
                 'oracle': float(np.mean(best)),
                 'gap': float(np.mean(gaps)), 'within_0.01': int(sum(g <= 0.01 for g in gaps))}
  return out


def _source(wd: str) -> str:
  """The pseudo-label source a run trained on, as its pseudo-label stage recorded it (the per-case
  report's 'source'; 'gmm' where no report says otherwise)."""
  reports = os.path.join(wd, 'pseudo_labels', 'reports')
  names = sorted(os.listdir(reports)) if os.path.isdir(reports) else []
  if not names:
    return 'gmm'
  with open(os.path.join(reports, names[0])) as f:
    return json.load(f).get('source', 'gmm')


def _length_summary(per_seed_tracks: dict) -> dict:
  """{seed: track rows} -> {signal: {step: mean over seeds of the case-mean}} on common steps."""
  steps = sorted(set.intersection(*[{r['step'] for r in t} for t in per_seed_tracks.values()]))
  out = {}
  for k in ('dice', 'flip_agreement', 'p_agreement', 'confident_ce'):
    vals = {s: [r[k] for t in per_seed_tracks.values() for r in t if r['step'] == s and k in r]
            for s in steps}
    if all(vals.values()):
      out[k] = {s: float(np.mean(v)) for s, v in vals.items()}
  return out


def _p_seconds(wd) -> float:
  """Mean pseudo-label seconds per case (GMM fit and cleanup, from the per-case reports)."""
  d = os.path.join(wd, 'pseudo_labels', 'reports')
  secs = []
  for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    with open(os.path.join(d, n)) as f:
      secs.append(json.load(f).get('seconds', float('nan')))
  return float(np.nanmean(secs)) if secs else float('nan')


def trained_config(config, row, seed: int, track_every: int = -1):
  """The config a trained row runs with for one seed, before its eval.* switches (run_table applies
  those to the trained networks; here only where the training config is inconsistent without
  them). A row whose P does not come from the mixture (threshold, ground
  truth) has no mixture to draw the edge from: its edge rule is off."""
  c = _apply(config, {k: v for k, v in row.overrides.items() if not k.startswith('eval.')})
  if config_rules.problems(c):  # the row's eval switches make its training config consistent
    c = _apply(c, row.overrides)  # (symmetry_margin 0 needs border_symmetry off)
  c.pseudo_labels.source = row.source
  if row.source != 'gmm' and c.eval.get('border_mm', 0.0) > 0:
    logging.info('experiments: %s: P from %s, so no edge from the mixture (eval.border_mm = 0)',
                 row.name, row.source)
    c.eval.border_mm, c.eval.border_symmetry = 0.0, False
  c.train.seed = int(seed)
  c.eval.every_steps = max(1, c.train.steps // 6) if track_every < 0 else track_every
  if folds_lib.num_networks(c) > 1:  # each network is evaluated at its latest step
    c.eval.every_steps = 0
  return c


def run_table(config, base: str, table: str, seeds: list, track_every: int = -1,
              rows=None) -> dict:
  if table == 'length' and folds_lib.num_networks(config) > 1:
    raise errors.ConfigError(
        f'--table=length reads the label-free signals that one network tracks along training; '
        f'this config trains several (train.ensemble = {config.train.get("ensemble", 1)}, '
        f'train.folds = {config.train.get("folds", 1)}): add --config.train.ensemble=1 '
        f'--config.train.folds=1')
  pipeline.run(config, base, 'prepare')
  results = {}
  for row in rows or tables.TABLES.get(table) or tables.p_rows(config):
    name, t0 = row.name, time.time()
    pwd = p_workdir(config, base, row.source, row.overrides if row.kind == 'p' else None)
    if row.kind == 'p':  # P itself scored against the ground truth
      results[name] = _row_summary({'-': _p_rows(pwd)}, time.time() - t0)
      results[name]['seconds_per_case'] = _p_seconds(pwd)
      results[name]['per_case'] = {r['case']: r['dice'] for r in _p_rows(pwd)}
      continue
    per_seed, tracks, rounds_p, gaps = {}, {}, {}, {}
    # eval.* switches change no training: the row's networks are the trained configuration's,
    # evaluated again in a workdir of their own (_evaluate_run)
    evals = {k: v for k, v in row.overrides.items() if k.startswith('eval.')}
    for seed in seeds:
      c = trained_config(config, row, seed, track_every)
      wd, round_p = _train_run(c, base, pwd), []
      for _ in range(1, row.rounds):  # self-training: P = the last round's masks
        c = c.copy_and_resolve_references()
        c.pseudo_labels.source = 'nifti'
        c.pseudo_labels.nifti_dir = os.path.join(wd, paths.EVAL, 'predictions')
        rpwd = p_workdir(c, base, 'nifti', {'pseudo_labels.nifti_dir': c.pseudo_labels.nifti_dir})
        round_p.append(float(np.mean([r['dice'] for r in _p_rows(rpwd)])))
        wd = _train_run(c, base, rpwd)
      if evals:
        wd = _evaluate_run(_apply(c, evals), c, wd, base)
      row_link = os.path.join(base, 'experiments', table, tables.slug(name), f'seed{seed}')
      os.makedirs(os.path.dirname(row_link), exist_ok=True)
      _link(wd, row_link)
      with open(os.path.join(wd, paths.EVAL, 'summary.json')) as f:
        cases = json.load(f)['cases']
      per_seed[seed] = [{'case': r['case'], **{k[len('net_'):]: v for k, v in r.items()
                                                if k.startswith('net_')}} for r in cases]
      tracks[seed] = tracking.read_track(wd)
      gaps[seed] = term_gaps(wd)
      if round_p:
        rounds_p[seed] = round_p
    results[name] = _row_summary(per_seed, time.time() - t0)
    for key in ('fine_above_floor', 'coarse'):
      vals = [g[key] for g in gaps.values() if key in g]
      if len(vals) == len(gaps):
        results[name][key] = float(np.mean(vals))
    if rounds_p:  # the Dice of each later round's P (the previous round's masks), per seed
      results[name]['round_p_dice'] = rounds_p
    if table == 'length':
      results[name]['along_training'] = _length_summary(tracks)
  if table == 'length':
    runs = os.path.join(base, 'experiments', 'runs')
    results['stopping rules (every tracked run)'] = score_rules(
        [tracking.read_track(os.path.join(runs, d)) for d in sorted(os.listdir(runs))
         if _source(os.path.join(runs, d)) != 'ground_truth'])
  return results


def main(argv):
  del argv
  pipeline.cli(_main, FLAGS.verbose)


def _main():
  config = FLAGS.config
  seeds = [int(s) for s in FLAGS.seeds.split(',') if s.strip()]
  rows = None
  if FLAGS.table == 'pseudo_labels':
    rows = tables.p_rows(config) + (tables.channel_rows(FLAGS.channels) if FLAGS.channels else [])
  if FLAGS.rows:
    rows = tables.select_rows(rows or tables.TABLES[FLAGS.table], FLAGS.rows)
  try:
    results = run_table(config, FLAGS.workdir, FLAGS.table, seeds, FLAGS.track_every, rows)
  except errors.Preempted as e:  # as the main job: the state is saved, exit 0 for the scheduler
    logging.warning('%s', e)
    return
  out = os.path.join(FLAGS.workdir, 'experiments')
  os.makedirs(out, exist_ok=True)
  md = reports.markdown(FLAGS.table, results, config)
  from cgc_jax.core import store  # pylint: disable=g-import-not-at-top
  store.atomic_write_text(os.path.join(out, f'{FLAGS.table}.md'), md)
  store.atomic_write_json(os.path.join(out, f'{FLAGS.table}.json'), results)
  print(md)


if __name__ == '__main__':
  app.run(main)
