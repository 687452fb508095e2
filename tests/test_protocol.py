"""The selection protocol: fixed halves by site, paired per-case differences, the bootstrap
interval against a plain NumPy loop, and the rule's verdicts on hand-made cases."""
import json
import os

import numpy as np
import pytest

from cgc_jax.studies import protocol
from cgc_jax.studies import reports

DEV = ['Brats18_2013_11_1', 'Brats18_2013_20_1', 'Brats18_2013_23_1', 'Brats18_2013_2_1',
       'Brats18_2013_3_1', 'Brats18_CBICA_ABM_1', 'Brats18_CBICA_ALU_1', 'Brats18_CBICA_AME_1',
       'Brats18_TCIA01_201_1', 'Brats18_TCIA01_378_1', 'Brats18_TCIA01_425_1',
       'Brats18_TCIA01_499_1', 'Brats18_TCIA02_135_1', 'Brats18_TCIA02_370_1',
       'Brats18_TCIA02_606_1', 'Brats18_TCIA03_265_1', 'Brats18_TCIA10_628_1',
       'Brats18_TCIA10_637_1', 'Brats18_TCIA10_639_1', 'Brats18_TCIA13_623_1']


def test_the_development_cases_split_by_site_into_two_halves_of_ten():
  assert protocol.site_of('Brats18_TCIA01_201_1') == 'TCIA01'
  assert protocol.site_of('Brats18_2013_11_1') == '2013'
  assert protocol.site_of('case_3') == 'case_3'
  a, b = protocol.halves(reversed(DEV))  # the order given does not matter
  # sites by size: 2013 (5) -> A, TCIA01 (4) -> B, CBICA (3) -> B, TCIA02 (3) -> A,
  # TCIA10 (3) -> B, TCIA03 (1) -> A, TCIA13 (1) -> A
  assert {protocol.site_of(c) for c in a} == {'2013', 'TCIA02', 'TCIA03', 'TCIA13'}
  assert {protocol.site_of(c) for c in b} == {'TCIA01', 'CBICA', 'TCIA10'}
  assert len(a) == len(b) == 10 and sorted(a + b) == sorted(DEV)


def test_cases_without_sites_alternate_in_name_order():
  assert protocol.halves(['c', 'a', 'd', 'b', 'e']) == (['a', 'c', 'e'], ['b', 'd'])


def test_differences_are_paired_per_case_and_pooled_over_seeds():
  base = {0: {'x': 0.5, 'y': 0.8}, 1: {'x': 0.7, 'y': 0.6}, 2: {'x': 0.1}}
  row = {0: {'x': 0.6, 'y': 0.7}, 1: {'x': 0.9, 'y': 0.9}}
  d = protocol.per_case_difference(base, row)
  assert set(d) == {'x', 'y'}
  np.testing.assert_allclose([d['x'], d['y']], [(0.1 + 0.2) / 2, (-0.1 + 0.3) / 2], rtol=1e-12)


def test_the_bootstrap_interval_is_the_percentiles_of_resampled_means():
  diffs = np.array([0.02, -0.01, 0.05, 0.0, 0.03, 0.01, -0.02, 0.04])
  mean, lo, hi = protocol.bootstrap_interval(diffs, n=500, seed=3)
  rng = np.random.default_rng(3)
  idx = rng.integers(0, diffs.size, size=(500, diffs.size))
  means = [diffs[row].mean() for row in idx]  # one resample at a time
  assert mean == diffs.mean()
  np.testing.assert_allclose([lo, hi], np.percentile(means, [2.5, 97.5]), rtol=1e-12)
  assert protocol.bootstrap_interval([0.01] * 5) == (0.01, 0.01, 0.01)


def _table(gain_a, gain_b, base=0.7):
  a, b = protocol.halves(DEV)
  return ({s: {c: base for c in DEV} for s in (0, 1)},
          {s: {c: base + (gain_a if c in a else gain_b) + 0.001 * s for c in DEV} for s in (0, 1)})


def test_the_rule_needs_both_halves_the_interval_and_the_sample_cases():
  base, row = _table(0.01, 0.02)
  c = protocol.compare(base, row)
  np.testing.assert_allclose([c['half_a'], c['half_b'], c['mean']], [0.0105, 0.0205, 0.0155],
                             rtol=1e-9)
  assert c['low'] > 0 and c['verdict'] == 'gains (dev only)' and c['cases'] == 20
  sample_base = {0: {'s1': 0.8, 's2': 0.8}}
  assert protocol.compare(base, row, sample_base, {0: {'s1': 0.81, 's2': 0.8}})['verdict'] == \
      'gains'
  lost = protocol.compare(base, row, sample_base, {0: {'s1': 0.79, 's2': 0.8}})
  assert lost['sample'] < 0 and lost['verdict'] == 'undecided'
  base, row = _table(0.03, -0.005)  # gains on all cases pooled, loses on half B
  c = protocol.compare(base, row)
  assert c['low'] > 0 and c['half_b'] < 0 and c['verdict'] == 'undecided (dev only)'
  base, row = _table(-0.01, -0.02)
  assert protocol.compare(base, row)['verdict'] == 'loses (dev only)'


def test_a_table_is_read_from_its_row_links_and_printed(tmp_path):
  for row, seed, dice in (('recipe', 0, (0.5, 0.6)), ('recipe', 1, (0.7, 0.6)),
                          ('switch', 0, (0.6, 0.6)), ('switch', 1, (0.8, 0.7))):
    d = tmp_path / 'experiments' / 'defaults' / row / f'seed{seed}' / 'eval'
    d.mkdir(parents=True)
    cases = [{'case': c, 'net_dice': v} for c, v in zip(('case_0', 'case_1'), dice)]
    (d / 'summary.json').write_text(json.dumps({'cases': cases}))
  got = protocol.table_dice(str(tmp_path), 'defaults')
  assert got == {'recipe': {0: {'case_0': 0.5, 'case_1': 0.6}, 1: {'case_0': 0.7, 'case_1': 0.6}},
                 'switch': {0: {'case_0': 0.6, 'case_1': 0.6}, 1: {'case_0': 0.8, 'case_1': 0.7}}}
  c = protocol.judge(got, first='recipe')['switch']
  np.testing.assert_allclose([c['half_a'], c['half_b']], [0.1, 0.05], rtol=1e-9)
  bad = tmp_path / 'experiments' / 'defaults' / 'broken' / 'seed0' / 'eval'
  bad.mkdir(parents=True)
  (bad / 'summary.json').write_text('{cut')
  with pytest.raises(ValueError, match=r'broken/seed0/eval/summary.json: not an evaluation'):
    protocol.table_dice(str(tmp_path), 'defaults')
  md = protocol.markdown({'switch': c}, 'recipe')
  assert '| switch | 0,1 | +0.1000 | +0.0500 | +0.0750 [+0.0500, +0.1000] | - | gains (dev ' \
      'only) |' in md


def test_every_table_prints_the_paired_comparison_with_its_first_row():
  def summary(seed_dice):
    return {'seeds': sorted(seed_dice), 'per_case_seeds': seed_dice}
  results = {'recipe': summary({0: {'a': 0.5, 'b': 0.5}}), 'P': {'seeds': ['-']},
             'switch': summary({0: {'a': 0.6, 'b': 0.5}})}
  md = reports.paired_markdown(results)
  assert 'against "recipe"' in md and '| switch | 0 | +0.1000 | +0.0000 | +0.0500' in md
  assert reports.paired_markdown({'recipe': results['recipe']}) == ''
