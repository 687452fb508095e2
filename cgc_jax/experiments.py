"""The paper's tables as named sets of config variants sharing the offline stages.

    python -m cgc_jax.experiments --config=configs/demo.py --workdir=runs/demo --table=methods

Tables: methods, ablation, temperature, length, weights, refine, cgc (see TABLES). The prepare stage
runs once in --workdir; each pseudo-label source runs once (WORKDIR/experiments/p_<source>/); each
trained configuration and seed runs once, in WORKDIR/experiments/runs/<train fingerprint>/ (linking
to those shared stages; train + evaluate), and every table row that names it links there
(WORKDIR/experiments/<table>/<row>/seed<s>): the full CGC run of `methods` is the tau = 0.2 row of
`temperature`, and an interrupted table resumes where it stopped. A row's eval.* switches train
nothing: the networks of its other switches are evaluated again, in
WORKDIR/experiments/evals/<train fingerprint>_<evaluate fingerprint>/. Every trained run tracks the
label-free signals and Dice along training (eval.every_steps, `--track_every`). Writes
WORKDIR/experiments/<table>.{md,json}: mean +- std over cases (pooled over seeds) of Dice,
sensitivity and ASSD, the std of the per-seed mean Dice across seeds, and run time; `length` writes
Dice and the signals against steps and scores the label-free stopping rules (STOP_RULES) on every
tracked run.

Mini-patch sizes z are given as fractions of the bottleneck (1/2, 1/4, 1/8 of each axis, at least
1): the paper's 12x12x4, 6x6x2 and 3x3x1 are those fractions of its 24x24x8 bottleneck (192x192x64
crops), and a smaller crop keeps the same relation.
"""
import json
import math
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags

from cgc_jax import errors
from cgc_jax import evaluate
from cgc_jax import folds as folds_lib
from cgc_jax import metrics
from cgc_jax import paths
from cgc_jax import pipeline

TABLE_NAMES = ('methods', 'ablation', 'temperature', 'length', 'weights', 'refine', 'cgc',
               'defaults', 'pseudo_labels')
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'configs/*.py file', lock_config=False)
flags.DEFINE_string('workdir', None, 'base workdir (its prepared data are shared by every row)')
flags.DEFINE_enum('table', 'methods', list(TABLE_NAMES), 'which table')
flags.DEFINE_string('channels', '', 'pseudo_labels table: extra rows with these GMM channel sets, '
                    '";"-separated, e.g. "flair,t1;flair,t1,t2"')
flags.DEFINE_string('seeds', '0,1', 'training seeds, comma separated')
flags.DEFINE_string('rows', '', 'only these rows of the table (1-based, comma separated; '
                    'default all): a table on a budget, resumable row by row')
flags.DEFINE_integer('track_every', -1, 'eval.every_steps of every trained run '
                     '(-1: train.steps // 6; 0: no tracking)')
flags.DEFINE_bool('verbose', False, 'Show Python tracebacks for data and stage errors.')
flags.mark_flags_as_required(['config', 'workdir'])

_BACKBONE = {'cgc.coarse': False, 'cgc.fine': False}
_FULL = {'cgc.coarse': True, 'cgc.fine': True}


def _z(fraction):
  return ('z', fraction)  # resolved against the config's bottleneck in _apply


ROUNDS = 'self_training.rounds'  # an override: train this many rounds, each on the last one's masks

# Row: (name, P source, overrides or None for a P-only row)
TABLES = {
    'methods': [
        ('GMM w/ threshold (P)', 'gmm', None),
        ('threshold method (P)', 'threshold', None),
        ('backbone + P (GMM)', 'gmm', _BACKBONE),
        ('full CGC (GMM P)', 'gmm', _FULL),
        ('full CGC (P from the threshold method)', 'threshold', _FULL),
        ('full supervision (P = ground truth)', 'ground_truth', _BACKBONE),
    ],
    'ablation': [
        ('backbone + P', 'gmm', _BACKBONE),
        ('+ global (coarse)', 'gmm', {'cgc.coarse': True, 'cgc.fine': False}),
        ('+ local (fine)', 'gmm', {'cgc.coarse': False, 'cgc.fine': True}),
        ('full, z = bottleneck/2 (paper 12x12x4)', 'gmm', dict(_FULL, **{'cgc.patch': _z(2)})),
        ('full, z = bottleneck/4 (paper 6x6x2)', 'gmm', dict(_FULL, **{'cgc.patch': _z(4)})),
        ('full, z = bottleneck/8 (paper 3x3x1)', 'gmm', dict(_FULL, **{'cgc.patch': _z(8)})),
    ],
    'temperature': [(f'full CGC, tau = {t}', 'gmm', dict(_FULL, **{'cgc.tau': t}))
                    for t in (0.07, 0.1, 0.2, 0.3, 0.7, 0.9)],
    'length': [('backbone + P', 'gmm', _BACKBONE), ('full CGC', 'gmm', _FULL)],
    # whether the CGC module helps at a given geometry (configs/brats_paper_geometry.py), and
    # readings of its fine term beyond the paper's
    'cgc': [('backbone + P', 'gmm', _BACKBONE), ('full CGC', 'gmm', _FULL),
            ('full CGC, fine term over cells within their mini-patch', 'gmm',
             dict(_FULL, **{'cgc.fine_anchors': 'cell'}))],
    # beyond the paper: learning from noisy P without memorising it (each row one switch on top
    # of the configured recipe; ROUNDS rows retrain on the previous round's network masks)
    'refine': [
        ('configured recipe', 'gmm', {}),
        ('generalised cross-entropy, q = 0.7', 'gmm', {'train.gce_q': 0.7}),
        ('hard bootstrapping, beta = 0.2', 'gmm', {'train.bootstrap': 0.2}),
        ('voxel weights from the GMM posterior, gamma = 1', 'gmm', {'train.confidence_gamma': 1.0}),
        ('self-training, round 2 (trained on round 1\'s masks)', 'gmm', {ROUNDS: 2}),
        ('twice the steps', 'gmm', {'train.steps': ('x', 2)}),
        ('early-learning regularisation, lambda = 3', 'gmm', {'train.elr_lambda': 3.0}),
        ('cross-fitting, 2 networks on half the cases each, their mean segmenting', 'gmm',
         {'train.folds': 2}),
        # evaluation only (the configured recipe's networks): one of the two is the recipe itself
        ('the edge from each case\'s mixture, 4 mm', 'gmm', {'eval.border_mm': 4.0}),
        ('the network\'s own edge (no edge from the mixture)', 'gmm', {'eval.border_mm': 0.0}),
        ('target correction from half-way, the network\'s own decision where it is 80% sure',
         'gmm', {'train.correct_threshold': 0.8}),
        ('P\'s left-right symmetric voxels left out of the loss (FLAIR margin 0.3)', 'gmm',
         {'train.symmetry_margin': 0.3, 'eval.border_symmetry': False}),
        ('P\'s symmetric voxels counted (no symmetry weights)', 'gmm',
         {'train.symmetry_margin': 0.0, 'eval.border_symmetry': False}),
        ('an ensemble: 2 networks on every case (seeds s, s + 1000), their mean segmenting',
         'gmm', {'train.ensemble': 2}),
        ('P\'s symmetric voxels out of the loss and out of the edge rule', 'gmm',
         {'train.symmetry_margin': 0.3, 'eval.border_symmetry': True}),
    ],
    # every default of the configured recipe, undone one at a time (the first row is the recipe
    # itself, the baseline of the paired comparison every table prints)
    'defaults': [
        ('configured recipe (every default on)', 'gmm', {}),
        ('symmetric voxels keep their say at the edge (eval.border_symmetry off)', 'gmm',
         {'eval.border_symmetry': False}),
        ('the network\'s own edge (eval.border_mm = 0)', 'gmm',
         {'eval.border_mm': 0.0, 'eval.border_symmetry': False}),
        ('every component kept (eval.keep_fraction = 0)', 'gmm', {'eval.keep_fraction': 0.0}),
        ('one network (train.ensemble = 1)', 'gmm', {'train.ensemble': 1}),
        ('symmetric voxels counted in the loss and at the edge (train.symmetry_margin = 0)', 'gmm',
         {'train.symmetry_margin': 0.0, 'eval.border_symmetry': False}),
        ('cross-entropy (train.gce_q = 0)', 'gmm', {'train.gce_q': 0.0}),
        ('half the steps', 'gmm', {'train.steps': ('x', 0.5)}),
    ],
    # not a paper table: how much the CGC terms' weight (both lambdas) matters
    'weights': [(f'full CGC, lambda = {w}', 'gmm',
                 dict(_FULL, **{'cgc.lambda_coarse': w, 'cgc.lambda_fine': w}))
                for w in (0.1, 1.0)],
}

# The pseudo-label variants (P only, no training): each rule of the pseudo-label stage added in
# turn.
_MRI_SIX = ('flair,t1:4', 'flair,t1:5', 'flair,t1,t2:4', 'flair,t1,t2:5', 'flair,t2:4',
            'flair,t2:5')
_OFF = {'gmm.ensemble': (), 'gmm.open_iterations': 0, 'gmm.keep_fraction': 0.0,
        'gmm.fill_holes': False, 'gmm.grow_mm': 0.0, 'gmm.min_contrast': float('-inf')}
_CLEAN = {'gmm.open_iterations': 1, 'gmm.keep_fraction': 0.1, 'gmm.fill_holes': True}


def p_rows(config) -> list:
  """The `pseudo_labels` table's rows for this config's kind of data (MRI: channel-set consensus;
  CT: one channel, so the consensus is over K)."""
  if config.data.kind == 'ct':
    k = int(config.gmm.k)
    members = tuple(f'ct:{j}' for j in (k - 2, k, k + 2))
    label = f'K = {k - 2}, {k}, {k + 2}'
  else:
    members, label = _MRI_SIX, 'FLAIR+T1, FLAIR+T1+T2, FLAIR+T2 x K = 4, 5'
  rows = [
      ('one mixture (gmm.channels, gmm.k), nothing else', _OFF),
      ('one mixture + cleanup (opening, major components, holes)', dict(_OFF, **_CLEAN)),
      ('one mixture + cleanup + grown 2 mm', dict(_OFF, **_CLEAN, **{'gmm.grow_mm': 2.0})),
      (f'consensus ({label}) + cleanup', dict(_OFF, **_CLEAN, **{'gmm.ensemble': members})),
      (f'consensus ({label}) + cleanup + grown 2 mm',
       dict(_OFF, **_CLEAN, **{'gmm.ensemble': members, 'gmm.grow_mm': 2.0})),
  ]
  if config.data.kind != 'ct':
    rows.append(('consensus with T1ce members too (8) + cleanup + grown 2 mm',
                 dict(_OFF, **_CLEAN, **{'gmm.ensemble': members + ('flair,t1,t1ce,t2:4',
                                                                     'flair,t1,t1ce,t2:5'),
                                         'gmm.grow_mm': 2.0})))
  rows.append(('P as configured', {}))
  return [(name, 'gmm', ('P', over)) for name, over in rows]

# Label-free checkpoint choice, scored on track.jsonl rows: (name, eval.select signal or None).
STOP_RULES = [('last step', None),
              ('first tracked step', 'first'),
              ('max flip agreement', 'flip_agreement'),
              ('min CE on confident P voxels', 'confident_ce'),
              ('min agreement with P', 'p_agreement')]


def _apply(config, overrides: dict):
  c = config.copy_and_resolve_references()
  bottleneck = [s // 2**(c.model.levels - 1) for s in c.train.crop]
  for key, value in overrides.items():
    section, field = key.split('.')
    if key == ROUNDS:
      continue  # handled by run_table
    if isinstance(value, tuple) and value and value[0] == 'z':
      value = tuple(max(1, b // value[1]) for b in bottleneck)
    if isinstance(value, tuple) and value and value[0] == 'x':  # a multiple of the configured value
      value = type(c[section][field])(c[section][field] * value[1])
    c[section][field] = value
  return c


def _slug(name: str) -> str:
  keep = ''.join(ch if ch.isalnum() else '_' for ch in name.lower())
  return '_'.join(p for p in keep.split('_') if p)[:60]


def _link(src, dst):
  if not os.path.lexists(dst):
    os.symlink(os.path.abspath(src), dst)


def p_workdir(config, base: str, source: str, p_overrides=None) -> str:
  """The workdir whose pseudo_labels/ holds P from `source` (with `p_overrides` of the gmm fields),
  sharing the base's prepared data."""
  from cgc_jax import fingerprints  # pylint: disable=g-import-not-at-top
  config = _apply(config, p_overrides or {})
  config.pseudo_labels.source = source
  if source == 'gmm' and not p_overrides:
    wd = base
  else:
    name = f'p_{source}' if not p_overrides else \
        f'p_{source}_{fingerprints.of(config, "pseudo_labels")}'
    wd = os.path.join(base, 'experiments', name)
    os.makedirs(wd, exist_ok=True)
    for d in ('prepared', 'phantoms'):
      if os.path.exists(os.path.join(base, d)):
        _link(os.path.join(base, d), os.path.join(wd, d))
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
  return s


def term_gaps(wd: str) -> dict:
  """How much of each CGC term is left to learn over the last quarter of a run's logged steps:
  {'fine_above_floor': mean of fine - fine_floor, 'coarse': mean coarse loss}, the keys present
  where the run logged them (runs before the floor was logged have no fine_above_floor). ~0 means
  the term gives the encoder no gradient."""
  rows = evaluate.read_step_rows(paths.metrics_file(wd))
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
  from cgc_jax import fingerprints  # pylint: disable=g-import-not-at-top
  return os.path.join(base, 'experiments', 'runs', fingerprints.of(config, 'train'))


def _evaluate_run(c, trained_config, trained: str, base: str) -> str:
  """Evaluates config `c`, which differs from `trained_config` (the run in workdir `trained`) in
  eval.* fields only, on that run's networks, in a workdir of its own
  (WORKDIR/experiments/evals/<train fingerprint>_<evaluate fingerprint>/) that links the run's
  stages, so one network holds any number of evaluations. Returns that workdir, or `trained` when
  the evaluation is the run's own."""
  from cgc_jax import fingerprints  # pylint: disable=g-import-not-at-top
  fp = fingerprints.of(c, 'evaluate')
  if fp == fingerprints.of(trained_config, 'evaluate'):
    return trained
  wd = os.path.join(base, 'experiments', 'evals', f'{fingerprints.of(c, "train")}_{fp}')
  os.makedirs(wd, exist_ok=True)
  for d in ('prepared', 'phantoms', 'pseudo_labels', paths.CHECKPOINTS, paths.TRAIN,
            folds_lib.FOLDS, folds_lib.ENSEMBLE):
    if os.path.exists(os.path.join(trained, d)):
      _link(os.path.join(trained, d), os.path.join(wd, d))
  logging.info('experiments: evaluating the networks of %s in %s', trained, wd)
  pipeline.run(c, wd, 'evaluate')
  return wd


def _train_run(c, base: str, pwd: str) -> str:
  """Trains and evaluates config `c` on the pseudo-labels of workdir `pwd`; returns its workdir."""
  wd = run_dir(base, c)
  os.makedirs(wd, exist_ok=True)
  for d in ('prepared', 'phantoms', 'pseudo_labels'):
    if os.path.exists(os.path.join(pwd, d)):
      _link(os.path.join(pwd, d), os.path.join(wd, d))
  logging.info('experiments: training %s (P from %s, seed %s)', wd, c.pseudo_labels.source,
               c.train.seed)
  pipeline.run(c, wd, 'all')
  if not os.path.exists(os.path.join(wd, paths.EVAL, 'summary.json')):  # train saved and stopped
    raise errors.Preempted(f'experiments: SIGTERM while training {wd}: its state is saved; re-run '
                           'the same command to continue the table')
  return wd


def score_rules(tracks: list) -> dict:
  """tracks: per run, its track rows with 'dice'. -> per rule: mean chosen step, mean Dice at it,
  mean oracle (best-step) Dice, mean gap to the oracle, runs within 0.01 of the oracle."""
  tracks = [t for t in tracks if t and all('dice' in r for r in t)]
  out = {}
  for name, signal in STOP_RULES:
    chosen = [t[0] if signal == 'first' else evaluate.pick(t, signal) for t in tracks]
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


def channel_rows(spec: str) -> list:
  """'flair,t1;flair,t1,t2' -> pseudo_labels rows with those GMM channel sets (cleanup as
  configured)."""
  return [(f'one mixture of {"+".join(ch)} (K as configured) + cleanup', 'gmm',
           ('P', dict(_OFF, **_CLEAN, **{'gmm.channels': ch})))
          for ch in (tuple(c.strip() for c in g.split(',') if c.strip()) for g in spec.split(';'))
          if ch]


def _p_seconds(wd) -> float:
  """Mean pseudo-label seconds per case (GMM fit and cleanup, from the per-case reports)."""
  d = os.path.join(wd, 'pseudo_labels', 'reports')
  secs = []
  for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    with open(os.path.join(d, n)) as f:
      secs.append(json.load(f).get('seconds', float('nan')))
  return float(np.nanmean(secs)) if secs else float('nan')


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
  for name, source, overrides in rows or TABLES.get(table) or p_rows(config):
    t0 = time.time()
    p_over = overrides[1] if isinstance(overrides, tuple) else None
    pwd = p_workdir(config, base, source, p_over)
    if overrides is None or p_over is not None:  # a P-only row: P scored against ground truth
      results[name] = _row_summary({'-': _p_rows(pwd)}, time.time() - t0)
      results[name]['seconds_per_case'] = _p_seconds(pwd)
      results[name]['per_case'] = {r['case']: r['dice'] for r in _p_rows(pwd)}
      continue
    per_seed, tracks, rounds_p, gaps = {}, {}, {}, {}
    # eval.* switches change no training: the row's networks are the trained configuration's,
    # evaluated again in a workdir of their own (_evaluate_run)
    evals = {k: v for k, v in overrides.items() if k.startswith('eval.')}
    for seed in seeds:
      c = _apply(config, {k: v for k, v in overrides.items() if k not in evals})
      c.pseudo_labels.source = source
      c.train.seed = int(seed)
      c.eval.every_steps = max(1, c.train.steps // 6) if track_every < 0 else track_every
      if folds_lib.num_networks(c) > 1:  # each network is evaluated at its latest step
        c.eval.every_steps = 0
      wd, round_p = _train_run(c, base, pwd), []
      for _ in range(1, int(overrides.get(ROUNDS, 1))):  # self-training: P = last round's masks
        c = c.copy_and_resolve_references()
        c.pseudo_labels.source = 'nifti'
        c.pseudo_labels.nifti_dir = os.path.join(wd, paths.EVAL, 'predictions')
        rpwd = p_workdir(c, base, 'nifti', {'pseudo_labels.nifti_dir': c.pseudo_labels.nifti_dir})
        round_p.append(float(np.mean([r['dice'] for r in _p_rows(rpwd)])))
        wd = _train_run(c, base, rpwd)
      if evals:
        wd = _evaluate_run(_apply(c, evals), c, wd, base)
      row_link = os.path.join(base, 'experiments', table, _slug(name), f'seed{seed}')
      os.makedirs(os.path.dirname(row_link), exist_ok=True)
      _link(wd, row_link)
      with open(os.path.join(wd, paths.EVAL, 'summary.json')) as f:
        cases = json.load(f)['cases']
      per_seed[seed] = [{k[len('net_'):]: v for k, v in r.items() if k.startswith('net_')}
                        for r in cases]
      tracks[seed] = evaluate.read_track(wd)
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
        [evaluate.read_track(os.path.join(runs, d)) for d in sorted(os.listdir(runs))
         if _source(os.path.join(runs, d)) != 'ground_truth'])
  return results


def _fmt(v) -> str:
  return '-' if v is None else f'{v:.4f}'


def markdown(table: str, results: dict, config) -> str:
  if table == 'length':
    return length_markdown(results, config)
  seeds = max((len(s['seeds']) for s in results.values() if s['seeds'] != ['-']), default=0)
  if table == 'pseudo_labels':
    return p_markdown(results, config)
  lines = [f'Table `{table}` ({config.data.layout}, {seeds} seed(s) per trained row; mean +- std '
           'over cases pooled over seeds; P rows: the pseudo-labels themselves)', '',
           '| row | Dice | std of seed means | Sensitivity | ASSD [mm] | time [s] | '
           'fine loss above its floor, coarse loss (last quarter of training) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for name, s in results.items():
    sd = s['dice_std_across_seeds']
    if s.get('round_p_dice'):  # self-training: how good the last round's labels were
      name += ' (its P: {:.4f})'.format(np.mean([r[-1] for r in s['round_p_dice'].values()]))
    lines.append(f'| {name} | {s["dice"]["mean"]:.4f} +- {s["dice"]["std"]:.4f} | '
                 f'{"-" if math.isnan(sd) else f"{sd:.4f}"} | {s["sensitivity"]["mean"]:.4f} +- '
                 f'{s["sensitivity"]["std"]:.4f} | {s["assd"]["mean"]:.2f} +- '
                 f'{s["assd"]["std"]:.2f} | {s["seconds"]:.0f} | '
                 f'{_fmt(s.get("fine_above_floor"))}, {_fmt(s.get("coarse"))} |')
  return '\n'.join(lines) + '\n'


def p_markdown(results: dict, config) -> str:
  """The pseudo-label table: per row mean +- std, empty masks, seconds per case, then Dice per
  case."""
  lines = [f'Table `pseudo_labels` ({config.data.layout}; P alone against the ground truth on each '
           'scan\'s original grid; deterministic, so no seeds)', '',
           '| row | Dice | Sensitivity | ASSD [mm] | empty P | s/case |', '| --- ' * 6 + '|']
  for name, s in results.items():
    lines.append(f'| {name} | {s["dice"]["mean"]:.4f} +- {s["dice"]["std"]:.4f} | '
                 f'{s["sensitivity"]["mean"]:.4f} | {s["assd"]["mean"]:.2f} | '
                 f'{s["empty_pred_cases"]}/{s["cases"]} | '
                 f'{s.get("seconds_per_case", float("nan")):.2f} |')
  cases = sorted({c for s in results.values() for c in s.get('per_case', {})})
  if cases:
    names = list(results)
    lines += ['', 'Dice per case (rows in the order above):', '',
              '| case | ' + ' | '.join(str(i + 1) for i in range(len(names))) + ' |',
              '| --- ' * (len(names) + 1) + '|']
    for c in cases:
      lines.append(f'| {c} | ' + ' | '.join(
          f'{results[n]["per_case"].get(c, float("nan")):.3f}' for n in names) + ' |')
  return '\n'.join(lines) + '\n'


_SIGNALS = {'dice': 'Dice vs ground truth (analysis only)', 'flip_agreement': 'flip agreement',
            'p_agreement': 'agreement with P', 'confident_ce': 'CE on confident P voxels'}


def length_markdown(results: dict, config) -> str:
  rules = results.get('stopping rules (every tracked run)', {})
  rows = {k: v for k, v in results.items() if 'along_training' in v}
  lines = [f'Table `length` ({config.data.layout}, {config.train.steps} steps): mean over cases '
           '(prepared grid, no TTA) and seeds along training; final-step Dice with the evaluate '
           'stage\'s settings in the last column.', '']
  for name, s in rows.items():
    at = s['along_training']
    steps = sorted(next(iter(at.values())), key=int) if at else []
    lines += [f'**{name}** ({len(s["seeds"])} seed(s))', '',
              '| signal | ' + ' | '.join(f'step {k}' for k in steps) + ' | final (evaluate) |',
              '| --- ' * (len(steps) + 2) + '|']
    for k, label in _SIGNALS.items():
      if k in at:
        final = f'{s["dice"]["mean"]:.4f}' if k == 'dice' else ''
        lines.append(f'| {label} | ' + ' | '.join(f'{at[k][st]:.4f}' for st in steps) +
                     f' | {final} |')
    lines.append('')
  if rules:
    n = next(iter(rules.values()))['runs']
    lines += [f'Label-free stopping rules on every tracked run of this workdir ({n} runs, any '
              'table, none trained on the ground truth): Dice at the step each rule keeps against '
              'the best step of the same run (oracle).', '',
              '| rule | mean step kept | Dice kept | oracle Dice | mean gap | runs within 0.01 |',
              '| --- | --- | --- | --- | --- | --- |']
    for name, r in rules.items():
      lines.append(f'| {name} | {r["step"]:.0f} | {r["dice"]:.4f} | {r["oracle"]:.4f} | '
                   f'{r["gap"]:.4f} | {r["within_0.01"]}/{r["runs"]} |')
  return '\n'.join(lines) + '\n'


def select_rows(rows: list, spec: str) -> list:
  """'1,3' -> the first and third rows, in table order."""
  picks = sorted({int(v) for v in spec.split(',') if v.strip()})
  if not picks or picks[0] < 1 or picks[-1] > len(rows):
    raise ValueError(f'--rows={spec}: the table has rows 1..{len(rows)}')
  return [rows[i - 1] for i in picks]


def main(argv):
  del argv
  pipeline.cli(_main, FLAGS.verbose)


def _main():
  config = FLAGS.config
  seeds = [int(s) for s in FLAGS.seeds.split(',') if s.strip()]
  rows = None
  if FLAGS.table == 'pseudo_labels':
    rows = p_rows(config) + (channel_rows(FLAGS.channels) if FLAGS.channels else [])
  if FLAGS.rows:
    rows = select_rows(rows or TABLES[FLAGS.table], FLAGS.rows)
  try:
    results = run_table(config, FLAGS.workdir, FLAGS.table, seeds, FLAGS.track_every, rows)
  except errors.Preempted as e:  # as the main job: the state is saved, exit 0 for the scheduler
    logging.warning('%s', e)
    return
  out = os.path.join(FLAGS.workdir, 'experiments')
  os.makedirs(out, exist_ok=True)
  md = markdown(FLAGS.table, results, config)
  from cgc_jax import store  # pylint: disable=g-import-not-at-top
  store.atomic_write_text(os.path.join(out, f'{FLAGS.table}.md'), md)
  store.atomic_write_json(os.path.join(out, f'{FLAGS.table}.json'), results)
  print(md)


if __name__ == '__main__':
  app.run(main)
