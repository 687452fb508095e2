"""The experiment driver: z as bottleneck fractions, pooled and across-seed statistics, shared
stages."""
import glob
import json
import os

import numpy as np
import pytest

from cgc_jax import pipeline
from cgc_jax.inference import tracking
from cgc_jax.studies import experiments
from cgc_jax.studies import reports
from cgc_jax.studies import tables

from conftest import copy_inputs
from conftest import tiny_config


def test_patch_sizes_are_fractions_of_the_bottleneck():
  c = tiny_config(**{'train.crop': (192, 192, 64), 'model.levels': 4})
  got = [experiments._apply(c, {'cgc.patch': tables.Patch(f)}).cgc.patch for f in (2, 4, 8)]
  assert got == [(12, 12, 4), (6, 6, 2), (3, 3, 1)]  # the paper's three z on its 24x24x8 bottleneck
  c = tiny_config(**{'train.crop': (48, 64, 48), 'model.levels': 4})
  assert experiments._apply(c, {'cgc.patch': tables.Patch(8)}).cgc.patch == (1, 1, 1)


def test_row_summary_pools_cases_and_reports_the_spread_of_seed_means():
  def row(d):
    return {'dice': d, 'sensitivity': 1.0, 'assd': 2.0, 'pred_voxels': 1, 'ref_voxels': 1}
  s = experiments._row_summary({0: [row(0.5), row(0.7)], 1: [row(0.8), row(0.9)]}, 12.0)
  assert abs(s['dice']['mean'] - 0.725) < 1e-12
  assert abs(s['dice']['std'] - np.std([0.5, 0.7, 0.8, 0.9])) < 1e-12
  np.testing.assert_allclose(s['dice_seed_means'], [0.6, 0.85], rtol=1e-12)
  assert abs(s['dice_std_across_seeds'] - 0.125) < 1e-12
  md = reports.markdown('t', {'r': s}, tiny_config())
  assert '| r | 0.7250 +- 0.1479 | 0.1250 | 1.0000 +- 0.0000 | 2.00 +- 0.00 | 12 |' in md


@pytest.mark.slow
def test_a_table_shares_the_offline_stages(tiny_workdir, tmp_path, monkeypatch):
  base = str(tmp_path / 'base')
  copy_inputs(tiny_workdir, base)
  monkeypatch.setitem(tables.TABLES, 'mini', [
      tables.Row('GMM (P)', kind='p'), tables.Row('threshold (P)', source='threshold', kind='p'),
      tables.Row('P of scans prepared otherwise', {'data.crop_margin_mm': 2.0}, kind='p'),
      tables.Row('backbone + P', {'cgc.coarse': False, 'cgc.fine': False})])
  cfg = tiny_config(**{'train.steps': 2, 'train.checkpoint_every': 1})
  res = experiments.run_table(cfg, base, 'mini', [0])
  with open(os.path.join(tiny_workdir, 'pseudo_labels', 'summary.json')) as f:
    gmm_p = json.load(f)['summary']['dice']['mean']
  assert abs(res['GMM (P)']['dice']['mean'] - gmm_p) < 1e-12  # the base's own P, not redone
  assert os.path.exists(os.path.join(base, 'experiments', 'p_threshold', 'pseudo_labels'))
  assert os.path.islink(os.path.join(base, 'experiments', 'p_threshold', 'prepared'))
  # a data field's row prepares the scans again in its own workdir (not the base's shards)
  own = [d for d in glob.glob(os.path.join(base, 'experiments', 'p_gmm_*'))
         if os.path.isdir(os.path.join(d, 'pseudo_labels'))]
  assert len(own) == 1 and not os.path.islink(os.path.join(own[0], 'prepared'))
  with open(os.path.join(own[0], 'prepared', 'cases', 'phantom_mri_000', 'meta.json')) as f:
    assert json.load(f)['geometry']['crop_start'] != json.load(
        open(os.path.join(base, 'prepared', 'cases', 'phantom_mri_000', 'meta.json')))['geometry'][
            'crop_start']
  assert 0 < res['P of scans prepared otherwise']['dice']['mean'] <= 1
  run = os.path.join(base, 'experiments', 'mini', 'backbone_p', 'seed0')
  assert os.path.islink(os.path.join(run, 'prepared'))
  with open(os.path.join(run, 'eval', 'summary.json')) as f:
    assert abs(json.load(f)['summary']['CGC network']['dice']['mean'] -
               res['backbone + P']['dice']['mean']) < 1e-12
  # the same configuration in another table is the same run: linked, not retrained
  metrics_log = os.path.join(run, 'train', 'metrics.jsonl')
  before = os.path.getmtime(metrics_log), open(metrics_log).read()
  monkeypatch.setitem(tables.TABLES, 'length', [
      tables.Row('backbone', {'cgc.coarse': False, 'cgc.fine': False})])
  res = experiments.run_table(cfg, base, 'length', [0])
  assert (os.path.getmtime(metrics_log), open(metrics_log).read()) == before
  assert os.path.realpath(os.path.join(base, 'experiments', 'length', 'backbone', 'seed0')) == \
      os.path.realpath(run)
  track = tracking.read_track(run)
  assert [r['step'] for r in track] == [1, 2]  # every run tracks train.steps // 6 (at least 1)
  along = res['backbone']['along_training']
  assert along['dice'] == {1: track[0]['dice'], 2: track[1]['dice']}
  rules = res['stopping rules (every tracked run)']
  assert rules['last step']['runs'] == 1 and rules['last step']['dice'] == track[1]['dice']
  md = reports.markdown('length', res, cfg)
  assert '| step 1 | step 2 |' in md and '| last step | 2 |' in md
  # eval.select restores the checkpoint the label-free signal prefers
  for rule in ('flip_agreement', 'confident_ce'):
    c = experiments._apply(cfg, {'cgc.coarse': False, 'cgc.fine': False})
    c.eval.select = rule
    pipeline.run(c, run, 'evaluate')
    with open(os.path.join(run, 'eval', 'summary.json')) as f:
      assert json.load(f)['checkpoint_step'] == tracking.pick(track, rule)['step']


def test_a_row_links_its_current_run(tmp_path):
  """A row's seed link follows the row's configuration: linked again when it changed (a default
  changed in the config), left alone otherwise."""
  old, new, link = tmp_path / 'run_old', tmp_path / 'run_new', str(tmp_path / 'row' / 'seed0')
  for d in (old, new, tmp_path / 'row'):
    d.mkdir()
  experiments._link(str(old), link)
  assert os.path.realpath(link) == str(old)
  experiments._link(str(new), link)
  assert os.path.realpath(link) == str(new)
  experiments._link(str(new), link)
  assert os.path.realpath(link) == str(new) and sorted(os.listdir(tmp_path / 'row')) == ['seed0']


def test_stopping_rules_hand_values():
  def t(*rows):
    return [dict(step=s, dice=d, flip_agreement=f, confident_ce=c, p_agreement=p)
            for s, d, f, c, p in rows]
  a = t((10, 0.70, 0.90, 0.30, 0.8), (20, 0.80, 0.95, 0.20, 0.9), (30, 0.75, 0.95, 0.25, 0.95))
  b = t((10, 0.50, 0.80, 0.10, 0.7), (20, 0.60, 0.70, 0.40, 0.6), (30, 0.55, 0.85, 0.30, 0.9))
  assert tracking.pick(a, 'flip_agreement')['step'] == 20  # tie: the earliest
  r = experiments.score_rules([a, b, [], t((5, float('nan'), 1, 1, 1))[:0]])
  last = r['last step']
  assert last['runs'] == 2 and last['step'] == 30
  assert abs(last['dice'] - 0.65) < 1e-12 and abs(last['oracle'] - 0.70) < 1e-12
  assert abs(last['gap'] - 0.05) < 1e-12 and last['within_0.01'] == 0
  first = r['first tracked step']  # a: 0.70, b: 0.50
  assert first['step'] == 10 and abs(first['dice'] - 0.60) < 1e-12
  assert abs(first['gap'] - 0.10) < 1e-12
  flip = r['max flip agreement']  # a: step 20 (0.80, best); b: step 30 (0.55)
  assert flip['step'] == 25 and abs(flip['dice'] - 0.675) < 1e-12 and flip['within_0.01'] == 1
  ce = r['min CE on confident P voxels']  # a: step 20; b: step 10 (0.50, gap 0.10)
  assert ce['step'] == 15 and abs(ce['gap'] - 0.05) < 1e-12
  pa = r['min agreement with P']  # a: step 10 (0.70); b: step 20 (0.60, best)
  assert pa['step'] == 15 and abs(pa['dice'] - 0.65) < 1e-12 and pa['within_0.01'] == 1


def test_a_runs_pseudo_label_source_is_read_from_its_reports(tmp_path):
  base = tmp_path / 'base'
  for src, d in (('ground_truth', base / 'experiments' / 'p_ground_truth'),
                 ('threshold', base / 'experiments' / 'p_threshold'), ('gmm', base)):
    (d / 'pseudo_labels' / 'reports').mkdir(parents=True)
    (d / 'pseudo_labels' / 'reports' / 'case_0.json').write_text(json.dumps({'source': src}))
  for name, target in (('a', base / 'experiments' / 'p_ground_truth' / 'pseudo_labels'),
                       ('b', base / 'experiments' / 'p_threshold' / 'pseudo_labels'),
                       ('c', base / 'pseudo_labels')):
    (tmp_path / name).mkdir()
    os.symlink(target, tmp_path / name / 'pseudo_labels')
  got = [experiments._source(str(tmp_path / n)) for n in 'abc']
  assert got == ['ground_truth', 'threshold', 'gmm']


@pytest.mark.slow
def test_self_training_round_two_learns_from_round_ones_masks(tiny_workdir, tmp_path, monkeypatch):
  base = str(tmp_path / 'base')
  copy_inputs(tiny_workdir, base)
  monkeypatch.setitem(tables.TABLES, 'mini', [
      tables.Row('one round'), tables.Row('two rounds', rounds=2)])
  cfg = tiny_config(**{'train.steps': 2, 'train.checkpoint_every': 1})
  res = experiments.run_table(cfg, base, 'mini', [0])
  # round 2's P is round 1's network masks, scored after a round trip through the 4 mm prepared grid
  # (nearest there, linear back): close to, not exactly, their own Dice
  assert res['two rounds']['round_p_dice'][0][0] == pytest.approx(
      res['one round']['dice']['mean'], abs=0.002)
  r2 = os.path.realpath(os.path.join(base, 'experiments', 'mini', 'two_rounds', 'seed0'))
  r1 = os.path.realpath(os.path.join(base, 'experiments', 'mini', 'one_round', 'seed0'))
  assert r1 != r2
  with open(os.path.join(r2, 'config.json')) as f:
    pl = json.load(f)['pseudo_labels']
  assert pl['source'] == 'nifti'
  assert os.path.realpath(pl['nifti_dir']) == os.path.join(r1, 'eval', 'predictions')
  assert '(its P: ' in reports.markdown('mini', res, cfg)


@pytest.mark.slow
def test_an_evaluation_row_evaluates_the_trained_networks_again(tiny_workdir, tmp_path,
                                                                monkeypatch):
  """A row that changes eval.* only trains nothing: the recipe's networks are evaluated with its
  eval fields in a workdir of their own, and the recipe's own evaluation is left as it was."""
  from cgc_jax.core import fingerprints  # pylint: disable=g-import-not-at-top
  base = str(tmp_path / 'base')
  copy_inputs(tiny_workdir, base)
  monkeypatch.setitem(tables.TABLES, 'mini', [
      tables.Row('recipe'), tables.Row('edge', {'eval.border_mm': 8.0}),
      tables.Row('same as the recipe', {'eval.border_mm': 0.0})])
  cfg = tiny_config(**{'train.steps': 2, 'train.checkpoint_every': 1, 'eval.pictures': False})
  res = experiments.run_table(cfg, base, 'mini', [0], track_every=0)
  row = lambda name: os.path.realpath(
      os.path.join(base, 'experiments', 'mini', tables.slug(name), 'seed0'))
  recipe, edge = row('recipe'), row('edge')
  assert row('same as the recipe') == recipe  # its evaluation is the recipe's: nothing run again
  evals = os.path.join(os.path.realpath(base), 'experiments', 'evals')
  assert os.path.dirname(edge) == evals
  for d in ('checkpoints', 'train', 'pseudo_labels'):  # the recipe's networks, not a new training
    assert os.path.realpath(os.path.join(edge, d)) == os.path.realpath(os.path.join(recipe, d))
  assert os.listdir(os.path.join(base, 'experiments', 'runs')) == [os.path.basename(recipe)]
  want = experiments._apply(cfg, {'eval.border_mm': 8.0})
  want.train.seed, want.eval.every_steps = 0, 0
  summaries = {}
  for name, wd in (('recipe', recipe), ('edge', edge)):
    with open(os.path.join(wd, 'eval', 'summary.json')) as f:
      summaries[name] = json.load(f)
    assert res[name]['dice']['mean'] == pytest.approx(
        summaries[name]['summary']['CGC network']['dice']['mean'], abs=1e-12)
  assert summaries['edge']['fingerprint'] == fingerprints.of(want, 'evaluate')
  assert summaries['recipe']['fingerprint'] == fingerprints.of(cfg, 'evaluate')
  assert summaries['edge']['checkpoint_step'] == summaries['recipe']['checkpoint_step'] == 2
  assert res['same as the recipe']['dice'] == res['recipe']['dice']


def test_every_table_can_be_named_on_the_command_line():
  assert set(tables.TABLES) | {'pseudo_labels'} == set(tables.TABLE_NAMES)


def test_rows_select_a_budget_of_the_table():
  rows = tables.TABLES['refine']
  assert tables.select_rows(rows, '5,1') == [rows[0], rows[4]]
  assert len(rows) == 15
  with pytest.raises(ValueError, match='rows 1..15'):
    tables.select_rows(rows, '16')


def test_the_length_table_needs_one_network(tmp_path):
  """Tracking along training is one network's: with an ensemble the length table stops at once,
  naming the fix, and writes nothing."""
  from cgc_jax import errors  # pylint: disable=g-import-not-at-top
  base = str(tmp_path / 'base')
  with pytest.raises(errors.ConfigError, match='add --config.train.ensemble=1'):
    experiments.run_table(tiny_config(**{'train.ensemble': 2}), base, 'length', [0])
  assert not os.path.exists(base)


def test_a_sigterm_in_a_run_stops_the_table_without_a_row(tiny_workdir, tmp_path, monkeypatch):
  """Train saves and returns on SIGTERM (pipeline.run then returns too); the table must stop there,
  saying so, not read the run's missing evaluation."""
  from cgc_jax import errors  # pylint: disable=g-import-not-at-top
  from cgc_jax.stages import train  # pylint: disable=g-import-not-at-top
  base = str(tmp_path / 'base')
  copy_inputs(tiny_workdir, base)

  def preempted(*args, **kwargs):
    raise train.Preempted('SIGTERM: saved step 1; re-run the same command to continue')
  monkeypatch.setattr(train, 'train_and_evaluate', preempted)
  monkeypatch.setitem(tables.TABLES, 'mini', [tables.Row('backbone + P', {'cgc.fine': False})])
  cfg = tiny_config(**{'train.steps': 2})
  with pytest.raises(errors.Preempted, match='re-run the same command'):
    experiments.run_table(cfg, base, 'mini', [0], track_every=0)
  assert not os.path.exists(os.path.join(base, 'experiments', 'mini'))


def test_a_cross_fitting_row_trains_without_tracking(tiny_workdir, tmp_path, monkeypatch):
  """Tracking (eval.every_steps) is per network and not offered with train.folds >= 2: a table
  row with folds runs without it, rows without folds keep it."""
  from cgc_jax.core import config_rules  # pylint: disable=g-import-not-at-top
  base = str(tmp_path / 'base')
  copy_inputs(tiny_workdir, base)
  seen = []

  def stop(c, *args):
    seen.append((c.train.folds, c.eval.every_steps, config_rules.problems(c)))
    raise KeyboardInterrupt
  monkeypatch.setattr(experiments, '_train_run', stop)
  for folds in (2, 1):
    monkeypatch.setitem(tables.TABLES, 'mini', [tables.Row('row', {'train.folds': folds})])
    with pytest.raises(KeyboardInterrupt):
      experiments.run_table(tiny_config(**{'train.steps': 6}), base, 'mini', [0])
  assert seen == [(2, 0, []), (1, 1, [])]


def test_term_gaps_average_the_last_quarter_of_the_log(tmp_path):
  os.makedirs(tmp_path / 'train')
  rows = [{'step': i, 'fine': 3.0 + i, 'fine_floor': 2.0 + 0.5 * i, 'coarse': 0.1 * i}
          for i in range(1, 9)]
  with open(tmp_path / 'train' / 'metrics.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  got = experiments.term_gaps(str(tmp_path))
  # last quarter: steps 7 and 8; fine - floor = 1 + 0.5 i -> 4.5, 5.0; coarse 0.7, 0.8
  assert got['fine_above_floor'] == pytest.approx(4.75)
  assert got['coarse'] == pytest.approx(0.75)
  assert experiments.term_gaps(str(tmp_path / 'none')) == {}
  md = reports.markdown('cgc', {'full': dict(
      seeds=[0], dice_std_across_seeds=float('nan'), seconds=1.0, fine_above_floor=0.05,
      **{k: {'mean': 0.5, 'std': 0.1} for k in ('dice', 'sensitivity', 'assd')})}, tiny_config())
  assert '| 0.0500, - |' in md


def test_a_guided_ensemble_row_reuses_the_unguided_runs_network_zero(tmp_path):
  """Network 0 of a guided ensemble is the unguided ensemble's network 0: a row copies its
  checkpoints and logs where that run exists and the row has none, and nothing otherwise."""
  base = str(tmp_path)
  guided = tiny_config(**{'train.ensemble': 2, 'train.ensemble_guide': 'voxels'})
  plain = tiny_config(**{'train.ensemble': 2})
  src, wd = experiments.run_dir(base, plain), experiments.run_dir(base, guided)
  assert src != wd
  for d, name in (('checkpoints', '240'), ('train', 'metrics.jsonl')):
    os.makedirs(os.path.join(src, d))
    with open(os.path.join(src, d, name), 'w') as f:
      f.write(d)
  os.makedirs(wd)
  experiments._share_network0(guided, base, wd)
  with open(os.path.join(wd, 'checkpoints', '240')) as f:
    assert f.read() == 'checkpoints'
  with open(os.path.join(wd, 'train', 'metrics.jsonl')) as f:
    assert f.read() == 'train'
  # the row's own checkpoints are never replaced; an unguided row copies nothing
  with open(os.path.join(wd, 'checkpoints', '240'), 'w') as f:
    f.write('own')
  experiments._share_network0(guided, base, wd)
  with open(os.path.join(wd, 'checkpoints', '240')) as f:
    assert f.read() == 'own'
  other = os.path.join(base, 'other')
  os.makedirs(other)
  experiments._share_network0(plain, base, other)
  assert os.listdir(other) == []
