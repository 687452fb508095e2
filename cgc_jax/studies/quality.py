"""How well the label-free quality signals of P (labels.quality) rank the cases by P's real Dice.

    python -m cgc_jax.studies.quality --dev=runs/dev --sample=runs/sample

Each workdir is one the experiments ran in (its own config.json, P, references); the network
signal comes from the run of that config (experiments.run_dir), or the workdir's own evaluation.
Prints, per signal and for the combined scores (p_score: the four known before training, which
train.quality_weight uses; score: all five), Spearman's rank correlation with P's Dice on each
half of the development cases (protocol.halves), on all of them and on the sample cases. Ground
truth enters only here, to judge the signals; nothing a run does reads it. The network signal is
cached in WORKDIR/experiments/quality_network.json, the others in pseudo_labels/quality.json
(member agreement is refitted for P made before it was reported: ~8 s a case, once).

    python -m cgc_jax.studies.quality --dev=runs/dev --by_label   # what P misses, per label

With --by_label it prints instead, per case, P's Dice, its precision and the share of each
ground-truth label value (BraTS: 1 necrotic core, 2 oedema, 4 enhancing tumour) that P holds.
"""
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from cgc_jax import pipeline
from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import geometry
from cgc_jax.imaging import metrics
from cgc_jax.labels import quality
from cgc_jax.labels import references
from cgc_jax.stages import prepare
from cgc_jax.studies import protocol

COLUMNS = quality.SIGNALS + ('volume_fraction', 'p_score', 'score')


def _network_masks_dir(base: str, config) -> str:
  from cgc_jax.studies import experiments  # pylint: disable=g-import-not-at-top
  for wd in (base, experiments.run_dir(base, config)):
    d = os.path.join(wd, paths.EVAL, 'predictions')
    if os.path.isdir(d):
      return d
  return ''


def workdir_signals(base: str) -> dict:
  """{case: {signal: value, 'p_dice': P's Dice}} for the cases of `base` with ground truth."""
  config = pipeline.workdir_config(base)
  prepare.update_references(config, base)  # the label files, read into references/ when missing
  prep, out = paths.prepared_store(config, base), paths.pl_store(config, base)
  refs = paths.reference_store(config, base)
  cases = [c for c in prep.complete_cases() if out.is_complete(c) and refs.is_complete(c)]
  p_dice = {c: m['dice'] for c, m in references.p_scores(config, prep, out, refs, cases).items()}
  masks_dir = _network_masks_dir(base, config)
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  rows = quality.pseudo_label_signals(config, prep, out, cases)
  os.makedirs(os.path.join(base, 'experiments'), exist_ok=True)
  cache = store_lib.CaseCache(os.path.join(base, 'experiments', 'quality_network.json'))
  for c in cases if masks_dir else ():
    key = [out.identity(c), masks_dir]
    agree = cache.get(c, key)
    if agree is None:
      geom = geometry.Geometry.from_json(prep.meta(c)['geometry'])
      net = np.asarray(nib.load(os.path.join(masks_dir, f'{c}.nii.gz')).dataobj) > 0
      post = np.asarray(out.read(c, 'posterior'), np.float32)
      p_orig = geometry.prob_to_original_mask(post, geom, references.p_threshold(config)) > 0
      agree = metrics.dice(net, p_orig)
      cache.put(c, key, agree)
    rows[c] = dict(rows[c], network_agreement=agree)
  cache.save()
  combined, before = quality.score(rows), quality.score(rows, quality.P_SIGNALS)
  return {c: dict(rows[c], score=combined[c], p_score=before[c], p_dice=p_dice[c]) for c in cases}


def by_label(base: str, config=None) -> dict:
  """{case: {'dice', 'precision', 'share': {label value: fraction of its voxels in P}}} for the
  cases of `base` whose label file is readable: P on each scan's original grid against the label
  file's values (data.label_values above 0). config: the workdir's own (config.json) unless
  given."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  config = config or pipeline.workdir_config(base)
  prep, out = paths.prepared_store(config, base), paths.pl_store(config, base)
  files = {f.case_id: f for f in prepare.case_files(config, base)}
  rows = {}
  for c in prep.complete_cases():
    f = files.get(c)
    if not (f and f.label and os.path.exists(f.label) and out.is_complete(c)):
      continue
    geom = geometry.Geometry.from_json(prep.meta(c)['geometry'])
    post = np.asarray(out.read(c, 'posterior'), np.float32)
    p = geometry.prob_to_original_mask(post, geom, references.p_threshold(config)) > 0
    label = np.asarray(nib.load(f.label).dataobj)
    if label.shape[:3] != p.shape:
      continue
    label = label.reshape(p.shape)
    lesion = label > 0
    rows[c] = {'dice': metrics.dice(p, lesion),
               'precision': float((p & lesion).sum() / max(1, p.sum())),
               'share': {int(v): float((p & (label == v)).sum() / max(1, (label == v).sum()))
                         for v in config.data.label_values if v > 0 and (label == v).any()}}
  return rows


def spearman(rows: dict, cases: list, column: str) -> float:
  """Spearman's rho of `column` with P's Dice over `cases` (NaN rows left out)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x = np.array([rows[c][column] for c in cases], np.float64)
  y = np.array([rows[c]['p_dice'] for c in cases], np.float64)
  ok = ~np.isnan(x)
  if ok.sum() < 3 or np.all(x[ok] == x[ok][0]):
    return float('nan')
  return float(stats.spearmanr(x[ok], y[ok])[0])


def markdown(dev: dict, sample=None) -> str:
  a, b = protocol.halves(sorted(dev))
  head = ['signal', f'half A ({len(a)})', f'half B ({len(b)})', f'all ({len(dev)})']
  if sample:
    head.append(f'sample ({len(sample)})')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for col in COLUMNS:
    vals = [spearman(dev, a, col), spearman(dev, b, col), spearman(dev, sorted(dev), col)]
    if sample:
      vals.append(spearman(sample, sorted(sample), col))
    lines.append(f'| {col} | ' + ' | '.join(f'{v:+.2f}' for v in vals) + ' |')
  return '\n'.join(lines)


def _define_flags():
  flags.DEFINE_string('dev', None, 'the development cases\' experiments workdir')
  flags.DEFINE_string('sample', '', 'the sample cases\' experiments workdir (optional)')
  flags.DEFINE_bool('by_label', False, 'print what P holds of each ground-truth label, per case')
  flags.mark_flag_as_required('dev')


def main(argv):
  del argv
  if flags.FLAGS.by_label:
    for base in filter(None, (flags.FLAGS.dev, flags.FLAGS.sample)):
      rows = by_label(base)
      values = sorted({v for r in rows.values() for v in r['share']})
      print(f'{base}: P against each label value (share of its voxels that P holds)\n')
      print('| case | P Dice | P precision | ' + ' | '.join(f'label {v}' for v in values) + ' |')
      print('| --- | --- | --- |' + ' --- |' * len(values))
      for c, r in rows.items():
        print(f'| {c} | {r["dice"]:.3f} | {r["precision"]:.2f} | ' + ' | '.join(
            f'{r["share"][v]:.2f}' if v in r['share'] else '-' for v in values) + ' |')
      print()
    return
  dev = workdir_signals(flags.FLAGS.dev)
  sample = workdir_signals(flags.FLAGS.sample) if flags.FLAGS.sample else None
  print('Spearman rank correlation of each label-free signal with P\'s Dice\n')
  print(markdown(dev, sample))
  print('\nper case (development): P Dice, combined score')
  for c in sorted(dev, key=lambda k: dev[k]['score']):
    print(f'  {c}: {dev[c]["p_dice"]:.3f}  {dev[c]["score"]:.2f}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
