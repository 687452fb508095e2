"""Label-free signs of a case's P quality: what a run can know about where its pseudo-labels failed
without any ground truth.

Each signal is higher where P is more likely right, by construction (none is fitted to Dice):
  member_agreement   mean Dice of each mixture of the consensus with the vote (gmm.consensus);
                     low when each channel set and K marks something else
  ring_contrast      the voted lesion's lesion-channel contrast against the ring around it
  compactness        the largest component's share of P's voxels (one mass rather than scatter)
  sphericity         of P's largest component, pi^(1/3) (6 V)^(2/3) / A (1 for a ball; a rim, a
                     sulcal ribbon or a thin shell of grey matter scores far lower)
  network_agreement  Dice of the network's mask with P (statistics.csv p_agreement); a network
                     that learned from every case's P copies P where P is consistent across cases
and, for reference only (no direction is right for every data set), volume_fraction (P's share of
the brain). score() combines the signals as the mean of their ranks among the data set's cases
(0 = worst, 1 = best): equal weights, no threshold, nothing chosen by Dice.

train.quality_weight = s > 0 weighs each case's segmentation loss by 1 - s + s x its score from
the four signals known before training (P_SIGNALS), so the cases whose P looks worst teach the
network least and are segmented from what the other cases taught it.
"""
import os

import numpy as np
from scipy import ndimage

from cgc_jax.core import store as store_lib
from cgc_jax.imaging import geometry
from cgc_jax.labels import gmm

P_SIGNALS = ('member_agreement', 'ring_contrast', 'compactness', 'sphericity')
SIGNALS = P_SIGNALS + ('network_agreement',)


def shape_signals(p: np.ndarray, spacing) -> dict:
  """{'compactness', 'sphericity'} of a mask p (bool[X, Y, Z]) on a grid of `spacing` mm; NaN for
  an empty mask. The surface area counts exposed voxel faces (each face: the product of the two
  other spacings)."""
  p = np.asarray(p, bool)
  if not p.any():
    return {'compactness': float('nan'), 'sphericity': float('nan')}
  lab, n = ndimage.label(p, np.ones((3, 3, 3)))
  sizes = np.bincount(lab.ravel())[1:]
  largest = lab == (int(np.argmax(sizes)) + 1)
  sx, sy, sz = (float(v) for v in spacing)
  face = (sy * sz, sx * sz, sx * sy)
  padded = np.pad(largest, 1)
  area = sum(np.count_nonzero(np.diff(padded.astype(np.int8), axis=a)) * face[a] for a in range(3))
  volume = float(largest.sum()) * sx * sy * sz
  return {'compactness': float(sizes.max() / sizes.sum()),
          'sphericity': float(np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area)}


def case_signals(report: dict, p: np.ndarray, spacing, network_agreement=None) -> dict:
  """Every signal of one case: report, its P stage report (gmm.consensus); p: its P on the
  prepared grid; network_agreement: statistics.csv's p_agreement, or None (NaN)."""
  out = {'member_agreement': float(report.get('member_agreement', float('nan'))),
         'ring_contrast': float(report.get('contrast', float('nan'))),
         'network_agreement': float('nan') if network_agreement is None
                              else float(network_agreement),
         'volume_fraction': float(report.get('lesion_fraction', float('nan')))}
  out.update(shape_signals(p, spacing))
  return out


def ranks(values) -> np.ndarray:
  """Ranks in [0, 1] (mean rank for ties; NaN stays NaN); a single value ranks 0.5."""
  v = np.asarray(values, np.float64)
  out = np.full(v.shape, np.nan)
  ok = ~np.isnan(v)
  m = int(ok.sum())
  if m == 1:
    out[ok] = 0.5
  elif m > 1:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    out[ok] = (stats.rankdata(v[ok]) - 1) / (m - 1)
  return out


def score(signals: dict, names=SIGNALS) -> dict:
  """{case: combined score in [0, 1]} from {case: case_signals()}: per case, the mean over
  `names` of its rank among the cases (signals missing for every case are left out)."""
  cases = sorted(signals)
  cols = [ranks([signals[c].get(k, np.nan) for c in cases]) for k in names]
  cols = [c for c in cols if not np.all(np.isnan(c))]
  if not cols:
    return {c: float('nan') for c in cases}
  mean = np.nanmean(np.stack(cols), axis=0)
  return {c: float(v) for c, v in zip(cases, mean)}


def case_weights(signals: dict, strength: float) -> dict:
  """{case: 1 - strength + strength x score over P_SIGNALS} (train.quality_weight = strength); a
  case whose score cannot be ranked weighs 1."""
  sc = score(signals, P_SIGNALS)
  return {c: 1.0 if np.isnan(v) else float(1.0 - strength + strength * v) for c, v in sc.items()}


def pseudo_label_signals(config, prep, out, cases: list) -> dict:
  """{case: case_signals()} of the cases' P (no network signal), cached in out's quality.json by P
  shard identity. P made before its report held member_agreement has it refitted (the same
  mixtures, ~8 s a case, once)."""
  cache = store_lib.CaseCache(os.path.join(out.root, 'quality.json'))
  res = {}
  for c in cases:
    key = out.identity(c)
    res[c] = cache.get(c, key)
    if res[c] is not None:
      continue
    meta = prep.meta(c)
    geom = geometry.Geometry.from_json(meta['geometry'])
    report = dict(out.meta(c)['report'])
    if 'member_agreement' not in report and config.pseudo_labels.source == 'gmm':
      image = np.asarray(prep.read(c, 'image'), np.float32)
      brain = np.asarray(prep.read(c, 'brain')) > 0
      report['member_agreement'] = gmm.consensus(
          image, brain, list(meta['modalities']), config.gmm, c, geom.spacing,
          hu_scale=gmm.hu_scale(config))[2]['member_agreement']
    res[c] = case_signals(report, np.asarray(out.read(c, 'p')) > 0, geom.spacing)
    cache.put(c, key, res[c])
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  cache.save(distributed.is_main())
  return res
