"""How a switch earns its place as a default: a paired per-case comparison on two fixed halves of
the development cases, and a rule that twenty cases can be trusted with.

    python -m cgc_jax.studies.protocol --dev=runs/dev --sample=runs/sample --table=defaults

The halves hold whole acquisition sites (BraTS names carry the site: Brats18_<site>_<id>_1), so a
switch that gains on both gains across sites, not on one site's scans; a set without site names
splits case by case in name order. A row is compared with the table's first row case by case:
for each case, its Dice minus the first row's, averaged over the seeds both ran (seeds pooled, so
the case is the unit), then a bootstrap over cases gives the 95% interval of the mean difference.

The rule: a switch becomes (or stays) a default only when it gains on each half separately, its
interval on all the development cases excludes zero, and it does not lose on the sample cases
(mean paired difference >= 0 there). Nothing here reads a label: the Dice values come from
evaluations that scored masks made without them.
"""
import json
import os
import re

from absl import app
from absl import flags
import numpy as np

BOOTSTRAP = 10000  # resamples of the cases
LEVEL = 0.95  # the interval's coverage
_SITE = re.compile(r'^Brats\d+_(.+)_[^_]+_\d+$')


def site_of(case: str) -> str:
  """'Brats18_TCIA01_201_1' -> 'TCIA01', 'Brats18_2013_11_1' -> '2013'; a name without a site: the
  name itself."""
  m = _SITE.match(case)
  return m.group(1) if m else case


def halves(cases) -> tuple:
  """(half A, half B): sorted case lists holding whole sites, as equal in size as whole sites allow.
  Sites go, largest first (ties by name), to the half with fewer cases (ties: A). Fixed by the
  names alone, before any result."""
  sites = {}
  for c in sorted(cases):
    sites.setdefault(site_of(c), []).append(c)
  a, b = [], []
  for _, members in sorted(sites.items(), key=lambda kv: (-len(kv[1]), kv[0])):
    (a if len(a) <= len(b) else b).extend(members)
  return sorted(a), sorted(b)


def per_case_difference(base: dict, row: dict) -> dict:
  """{case: mean over the seeds both ran of row - base}. base, row: {seed: {case: Dice}}; a case
  missing from a seed of either is left out of that seed."""
  seeds = sorted(set(base) & set(row))
  out = {}
  for s in seeds:
    for c in set(base[s]) & set(row[s]):
      out.setdefault(c, []).append(float(row[s][c]) - float(base[s][c]))
  return {c: float(np.mean(v)) for c, v in sorted(out.items())}


def bootstrap_interval(diffs, n: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0) -> tuple:
  """(mean, low, high): the mean of diffs f[N] and the percentile interval of the means of n
  resamples of N cases with replacement (a fixed seed: the same numbers every time)."""
  d = np.asarray(diffs, np.float64)
  if d.size == 0:
    return float('nan'), float('nan'), float('nan')
  idx = np.random.default_rng(seed).integers(0, d.size, size=(n, d.size))
  means = d[idx].mean(axis=1)
  tail = (1 - level) / 2 * 100
  return float(d.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def compare(base: dict, row: dict, sample_base=None, sample_row=None) -> dict:
  """The paired comparison of `row` against `base` ({seed: {case: Dice}} each) on the development
  cases, their halves, and optionally the sample cases; with the rule's verdict on row - base."""
  d = per_case_difference(base, row)
  a, b = halves(d)
  mean, lo, hi = bootstrap_interval(list(d.values()))
  out = {'cases': len(d), 'mean': mean, 'low': lo, 'high': hi,
         'half_a': float(np.mean([d[c] for c in a])) if a else float('nan'),
         'half_b': float(np.mean([d[c] for c in b])) if b else float('nan'),
         'seeds': sorted(set(base) & set(row))}
  if sample_base is not None and sample_row is not None:
    s = per_case_difference(sample_base, sample_row)
    out['sample'] = float(np.mean(list(s.values()))) if s else float('nan')
  out['verdict'] = verdict(out)
  return out


def verdict(c: dict) -> str:
  """'gains' when row - base passes the rule, 'loses' when base - row does, else 'undecided'
  (without sample figures the sample condition is not checked and the word says so)."""
  def passes(sign):
    ok = sign * c['half_a'] > 0 and sign * c['half_b'] > 0 and (
        c['low'] > 0 if sign > 0 else c['high'] < 0)
    return ok and ('sample' not in c or sign * c['sample'] >= 0)
  suffix = '' if 'sample' in c else ' (dev only)'
  if passes(1):
    return 'gains' + suffix
  if passes(-1):
    return 'loses' + suffix
  return 'undecided' + suffix


def table_dice(workdir: str, table: str) -> dict:
  """{row folder: {seed: {case: network Dice}}} of a table run in `workdir` (its row links
  WORKDIR/experiments/<table>/<row>/seed<s>/eval/summary.json), in the table's order of rows when
  the table is known, else by name."""
  root = os.path.join(workdir, 'experiments', table)
  out = {}
  for row in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    for link in sorted(os.listdir(os.path.join(root, row))):
      path = os.path.join(root, row, link, 'eval', 'summary.json')
      if link.startswith('seed') and os.path.exists(path):
        try:
          with open(path) as f:
            cases = json.load(f)['cases']
        except (OSError, ValueError, KeyError) as e:
          raise ValueError(f'{path}: not an evaluation summary ({type(e).__name__}: {e})') from e
        out.setdefault(row, {})[int(link[4:])] = {r['case']: r['net_dice'] for r in cases}
  return out


def markdown(results: dict, first: str, names=None) -> str:
  """The comparison table of every row against row `first`: results {row: compare(...)}."""
  names = names or {}
  lines = [f'Paired per-case differences against "{names.get(first, first)}" (row - that row; '
           'seeds pooled per case; 95% bootstrap interval over cases)', '',
           '| row | seeds | half A | half B | all [95% interval] | sample | rule |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for row, c in results.items():
    sample = f'{c["sample"]:+.4f}' if 'sample' in c else '-'
    lines.append(f'| {names.get(row, row)} | {",".join(map(str, c["seeds"]))} | '
                 f'{c["half_a"]:+.4f} | {c["half_b"]:+.4f} | {c["mean"]:+.4f} [{c["low"]:+.4f}, '
                 f'{c["high"]:+.4f}] | {sample} | {c["verdict"]} |')
  return '\n'.join(lines) + '\n'


def judge(dev: dict, sample=None, first=None) -> dict:
  """{row: compare(...)} of every row of table_dice(dev) against its first row (or `first`), with
  the sample table's same rows where given."""
  first = first or next(iter(dev))
  sample = sample or {}
  return {row: compare(dev[first], dev[row], sample.get(first), sample.get(row))
          for row in dev if row != first}


FLAGS = flags.FLAGS


def _define_flags():  # only as a command: the runner imports this module beside its own flags
  flags.DEFINE_string('dev', None, 'workdir of the table on the development cases')
  flags.DEFINE_string('sample', None, 'workdir of the same table on the sample cases (optional)')
  flags.DEFINE_string('table', 'defaults', 'the table')
  flags.DEFINE_string('first', None, 'the row folder to compare against (default: the first row)')
  flags.mark_flags_as_required(['dev'])


def main(argv):
  del argv
  from cgc_jax.studies import tables  # pylint: disable=g-import-not-at-top
  try:
    dev = tables.in_order(table_dice(FLAGS.dev, FLAGS.table), FLAGS.table)
    sample = table_dice(FLAGS.sample, FLAGS.table) if FLAGS.sample else None
  except ValueError as e:
    raise SystemExit(str(e)) from None
  if not dev:
    raise SystemExit(f'{FLAGS.dev}: no finished rows of table {FLAGS.table}')
  a, b = halves(next(iter(next(iter(dev.values())).values())))
  first = FLAGS.first or next(iter(dev))
  print(f'half A ({len(a)}): {", ".join(a)}\nhalf B ({len(b)}): {", ".join(b)}\n')
  print(markdown(judge(dev, sample, first), first, tables.row_names(FLAGS.table)))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
