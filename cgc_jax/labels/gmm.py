"""Foreground-background determination: a per-case Gaussian mixture over brain voxels.

The mixture is fitted to ALL brain voxels, compressed: each channel is quantised to `gmm.bins`
levels, voxels sharing a cell are one weighted point at their centroid, and the cell's inner scatter
is added back in the M-step, so EM (full covariance) sees the exact first and second moments of the
data and approximates only the responsibilities inside a cell. A 240x240x155 brain (1.5M voxels)
becomes a few thousand weighted points; EM runs to convergence on them in milliseconds, and lands on
the optimum of a fit on every voxel (scikit-learn's, from the same start: the benchmark compares).
The start is k-means (best of several seeded runs) on a seeded subsample. Posteriors are then
computed for every brain voxel in one vectorised pass. Deterministic for a given seed, config and
case id.
"""
import time
import warnings
import zlib

import numpy as np
from scipy import ndimage
from sklearn import cluster
from sklearn import mixture
from sklearn.exceptions import ConvergenceWarning

from cgc_jax import errors
from cgc_jax.core import config_rules
from cgc_jax.imaging import morphology


GMMError = errors.GMMError  # defined in errors.py (every user-facing error in one place)


def case_seed(seed: int, case_id: str) -> np.random.SeedSequence:
  return np.random.SeedSequence([int(seed), zlib.crc32(case_id.encode())])


def seeded_centres(x: np.ndarray, k: int, lesion_col: int, lesion_value: float) -> np.ndarray:
  """k-means start for a small lesion class of known intensity (CT: fresh blood's HU range).

  k-1 centres at evenly spaced quantiles of the data, plus one at `lesion_value` in the lesion
  column: without it, k-means++ spends every centre on the large tissue classes and a bleed of
  0.2% of the brain never gets a component of its own (measured on the CT phantoms).
  """
  qs = np.quantile(x, np.linspace(0.05, 0.95, k - 1), axis=0)
  lesion = np.median(x, axis=0)
  lesion[lesion_col] = lesion_value
  return np.vstack([qs, lesion[None]])


def initial_params(x: np.ndarray, k: int, seed: int, reg_covar: float, n_init: int = 5,
                   centres=None) -> dict:
  """k-means (best of n_init, fixed seed) on `x: f32[N, D]` -> weights/means/precisions for EM.

  Several k-means starts matter: k-means++ seeding rarely picks a small lesion cluster, and a single
  start then splits a large tissue class instead; the lowest-inertia start isolates the lesion.
  """
  if centres is not None:
    km = cluster.KMeans(n_clusters=k, init=centres, n_init=1, random_state=seed).fit(x)
  else:
    km = cluster.KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
  resp = np.eye(k)[km.labels_]
  nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
  means = resp.T @ x / nk[:, None]
  prec = []
  for j in range(k):
    d = x - means[j]
    cov = (resp[:, j, None] * d).T @ d / nk[j] + reg_covar * np.eye(x.shape[1])
    prec.append(np.linalg.inv(cov))
  return {'weights_init': nk / nk.sum(), 'means_init': means, 'precisions_init': np.stack(prec)}


class Mixture:
  """Full-covariance Gaussian mixture parameters: weights_ f64[K], means_ f64[K, D],
  covariances_ f64[K, D, D]."""

  def __init__(self, weights, means, covariances):
    self.weights_, self.means_, self.covariances_ = weights, means, covariances

  def log_resp(self, x: np.ndarray):
    """x: f[N, D] -> (log responsibilities f64[N, K], log-likelihood f64[N])."""
    x = np.asarray(x, np.float64)
    k, d = self.means_.shape
    logp = np.empty((x.shape[0], k))
    for j in range(k):
      chol = np.linalg.cholesky(self.covariances_[j])  # LinAlgError when singular
      y = np.linalg.solve(chol, (x - self.means_[j]).T)  # triangular; D is tiny
      logp[:, j] = (np.log(self.weights_[j]) - 0.5 * (y * y).sum(0) - np.log(np.diag(chol)).sum()
                    - 0.5 * d * np.log(2 * np.pi))
    ll = np.logaddexp.reduce(logp, axis=1)
    return logp - ll[:, None], ll

  def predict_proba(self, x: np.ndarray) -> np.ndarray:
    return np.exp(self.log_resp(x)[0])


def compress(x: np.ndarray, bins: int, return_cell: bool = False):
  """Weighted cells of `x: f32[N, D]`: (centroids f64[M, D], counts f64[M], scatter f64[M, D, D])
  (+ each row's cell i64[N] if return_cell).

  scatter[m] = sum over the cell's voxels of (x - centroid)(x - centroid)^T, so that any weighted
  second moment of the data equals that of the centroids plus the scatter.
  """
  x = np.asarray(x, np.float64)
  lo, hi = x.min(0), x.max(0)
  q = np.minimum(((x - lo) / np.maximum(hi - lo, 1e-12) * bins).astype(np.int64), bins - 1)
  codes = np.ravel_multi_index(q.T, (bins,) * x.shape[1])
  _, inv, counts = np.unique(codes, return_inverse=True, return_counts=True)
  m, d = counts.shape[0], x.shape[1]
  counts = counts.astype(np.float64)
  cent = np.stack([np.bincount(inv, x[:, i], m) for i in range(d)], 1) / counts[:, None]
  dev = x - cent[inv]
  scatter = np.empty((m, d, d))
  for i in range(d):
    for j in range(i, d):
      scatter[:, i, j] = scatter[:, j, i] = np.bincount(inv, dev[:, i] * dev[:, j], m)
  return (cent, counts, scatter, inv) if return_cell else (cent, counts, scatter)


def em(cent, counts, scatter, init: dict, reg_covar: float, max_iter: int, tol: float):
  """Weighted EM from `init` (weights/means/precisions, as for scikit-learn) to convergence.

  Converged when the mean log-likelihood per voxel changes by less than `tol` (scikit-learn's
  criterion). Returns (Mixture, converged, iterations). LinAlgError on a singular covariance.
  """
  n = counts.sum()
  d = cent.shape[1]
  mix = Mixture(np.asarray(init['weights_init'], np.float64), np.asarray(init['means_init']),
                np.linalg.inv(init['precisions_init']))
  prev = -np.inf
  for it in range(1, max_iter + 1):
    log_r, ll = mix.log_resp(cent)
    lower = float((counts * ll).sum() / n)
    if abs(lower - prev) < tol:
      return mix, True, it - 1
    prev = lower
    resp = np.exp(log_r)
    r = resp * counts[:, None]  # voxel-weighted responsibilities
    nk = r.sum(0) + 10 * np.finfo(np.float64).eps
    means = r.T @ cent / nk[:, None]
    covs = np.empty((means.shape[0], d, d))
    for j in range(means.shape[0]):
      dev = cent - means[j]
      covs[j] = (
          (r[:, j, None] * dev).T @ dev + np.einsum('m,mij->ij', resp[:, j], scatter)) / nk[j]
      covs[j].flat[::d + 1] += reg_covar
    mix = Mixture(nk / n, means, covs)
  return mix, False, max_iter


def fit(x: np.ndarray, k: int, seed: int, gcfg, init=None, init_x=None, exact: bool = False):
  """Fits a full-covariance mixture to every row of `x: f32[N, D]`; returns (model, info).

  Compressed weighted EM (module docstring) unless exact=True: scikit-learn's GaussianMixture on
  every row (the benchmark's reference). `init`: starting parameters for the first attempt;
  re-seeded attempts start from k-means on `init_x` (default x). Singular covariance raises the
  regulariser x10; non-convergence re-seeds (both recorded in info).
  """
  reg = gcfg.reg_covar
  info = {'attempts': []}
  init_x = x if init_x is None else init_x
  cells = None if exact else compress(x, gcfg.bins)
  if cells is not None:
    info['cells'] = int(cells[1].shape[0])
  for attempt in range(gcfg.retries + 1):
    s = seed + 7919 * attempt
    try:
      p = init if (init is not None and attempt == 0) else initial_params(init_x, k, s, reg,
                                                                           gcfg.kmeans_inits)
      if exact:
        gm = mixture.GaussianMixture(k, covariance_type='full', reg_covar=reg,
                                     max_iter=gcfg.max_iter, tol=gcfg.tol, random_state=s, **p)
        with warnings.catch_warnings():
          warnings.simplefilter('ignore', ConvergenceWarning)
          gm.fit(x)
        converged, iters = bool(gm.converged_), int(gm.n_iter_)
      else:
        gm, converged, iters = em(*cells, p, reg, gcfg.max_iter, gcfg.tol)
    except (ValueError, np.linalg.LinAlgError) as e:
      info['attempts'].append({'seed': s, 'reg_covar': reg, 'error': str(e)[:200]})
      reg = max(reg * 10.0, 1e-6)
      continue
    info['attempts'].append({'seed': s, 'reg_covar': reg, 'converged': converged,
                             'iterations': iters})
    if converged:
      info.update(seed=s, reg_covar=reg, converged=True, iterations=iters)
      return gm, info
  raise GMMError(f'mixture did not converge after {gcfg.retries + 1} attempts '
                 f'({info["attempts"]}); try a larger gmm.max_iter, gmm.tol or gmm.reg_covar')


def lesion_components(means: np.ndarray, gcfg, lesion_col: int, hu_scale=None,
                      channel_names=None) -> list:
  """Indices of the lesion component(s) under the configured rule.

  means: f[K, C] component means (MRI: z-scores inside the brain); channel_names: the C channels'
  names (rule 'signature' only).
  - max_mean: the component of highest mean in the lesion channel;
  - hu_range: the components whose lesion-channel mean (in HU) lies in gmm.hu_range;
  - signature: among the components brighter than the brain's average in the lesion channel
    (z > 0), the one of highest sum over channels of gmm.signature's weight x mean (max_mean when
    none is brighter).
  """
  if gcfg.rule == 'max_mean':
    return [int(np.argmax(means[:, lesion_col]))]
  if gcfg.rule == 'hu_range':
    lo, hi = gcfg.hu_range
    hu = means[:,
               lesion_col] if hu_scale is None else hu_scale[0] + means[:, lesion_col] * hu_scale[1]
    return [int(j) for j in np.nonzero((hu >= lo) & (hu <= hi))[0]]
  if gcfg.rule == 'signature':
    if hu_scale is not None:
      raise ValueError("gmm.rule 'signature' reads z-scores: it is for MRI (CT: 'hu_range')")
    if channel_names is None:
      raise ValueError("gmm.rule 'signature' needs the mixture's channel names")
    weights = config_rules.parse_signature(gcfg.signature)
    w = np.asarray([weights.get(c, 0.0) for c in channel_names], np.float64)
    bright = means[:, lesion_col] > 0
    if not bright.any():
      return [int(np.argmax(means[:, lesion_col]))]
    return [int(np.argmax(np.where(bright, means @ w, -np.inf)))]
  raise ValueError(f'unknown gmm.rule {gcfg.rule!r} (max_mean | hu_range | signature)')


def pseudo_label(image: np.ndarray, brain: np.ndarray, channels: list, lesion_channel: int, gcfg,
                 case_id: str, hu_scale=None, full_fit: bool = False, channel_names=None):
  """Per-case GMM -> (posterior f32[X, Y, Z], P u8[X, Y, Z], report dict).

  image: f32[X, Y, Z, C] normalised; brain: bool[X, Y, Z]; channels: indices used as features;
  lesion_channel: index into `channels`. full_fit=True: scikit-learn on every brain voxel from the
  same start (the benchmark's reference), instead of the compressed fit. channel_names: the names
  of `channels` (gmm.rule 'signature').
  """
  t0 = time.time()
  brain = brain.astype(bool)
  x_all = np.asarray(image[brain][:, channels], np.float32)
  n = x_all.shape[0]
  post = np.zeros(brain.shape, np.float32)
  report = {'brain_voxels': int(n), 'k': int(gcfg.k)}
  rng = np.random.default_rng(case_seed(gcfg.seed, case_id))
  seed = int(rng.integers(2**31 - 1))
  if n < 10 * gcfg.k:
    report.update(status='brain_too_small', lesion_fraction=0.0, seconds=time.time() - t0)
    return post, post.astype(np.uint8), report
  sub = x_all if n <= gcfg.subsample else x_all[np.sort(rng.choice(n, gcfg.subsample,
                                                                   replace=False))]
  distinct = np.unique(sub, axis=0).shape[0]
  k = int(min(gcfg.k, distinct))
  if k < gcfg.k:
    report['k_reduced'] = f'only {distinct} distinct feature vectors: K lowered {gcfg.k} -> {k}'
  if k < 2:
    report.update(status='constant_features', lesion_fraction=0.0, seconds=time.time() - t0)
    return post, post.astype(np.uint8), report
  centres = None
  if gcfg.rule == 'hu_range':
    mid = float(np.mean(gcfg.hu_range))
    mid = mid if hu_scale is None else (mid - hu_scale[0]) / hu_scale[1]
    centres = seeded_centres(sub, k, lesion_channel, mid)
  init = initial_params(sub, k, seed, gcfg.reg_covar, gcfg.kmeans_inits, centres)
  gm, info = fit(x_all, k, seed, gcfg, init=init, init_x=sub, exact=full_fit)
  comps = lesion_components(gm.means_, gcfg, lesion_channel, hu_scale, channel_names)
  resp = gm.predict_proba(x_all)
  post[brain] = resp[:, comps].sum(1) if comps else 0.0
  raw = post > gcfg.threshold
  contrast = ring_contrast(image[..., channels[lesion_channel]], raw, brain, gcfg.ring_voxels)
  p = morphology.cleanup(raw, brain, gcfg.open_iterations, gcfg.keep_fraction,
                         gcfg.min_component_voxels, gcfg.fill_holes)
  post = consistent_posterior(post, p, gcfg.threshold)
  report.update(status='ok', **info, lesion_components=comps, means=gm.means_.tolist(),
                weights=gm.weights_.tolist(), contrast=contrast, raw_voxels=int(raw.sum()),
                lesion_fraction=float(p.sum() / n), lesion_voxels=int(p.sum()),
                seconds=time.time() - t0)
  return post, p.astype(np.uint8), report


def parse_member(spec: str) -> tuple:
  """'flair,t1:4' -> (('flair', 't1'), 4): one mixture of the consensus (channels, K)."""
  try:
    chans, k = spec.split(':')
    out = tuple(c.strip() for c in chans.split(',') if c.strip()), int(k)
  except ValueError:
    out = ((), 0)
  if not out[0] or out[1] < 2:
    raise ValueError(f'gmm.ensemble member {spec!r}: expected "channel,channel,...:K" with K >= 2')
  return out


def member_agreement(masks: list, voted: np.ndarray) -> float:
  """Mean Dice of each member's mask (bool[X, Y, Z]) with the voted one: 1 when the mixtures agree,
  low when each marks something else (a label-free sign of a poor P). Empty against empty is 1."""
  def dice(a, b):
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s
  return float(np.mean([dice(m, voted) for m in masks]))


def consensus(image: np.ndarray, brain: np.ndarray, modalities: list, gcfg, case_id: str,
              spacing, hu_scale=None):
  """P from a consensus of mixtures -> (posterior f32[X, Y, Z], P u8[X, Y, Z], report).

  image: f32[X, Y, Z, C] with channels named by `modalities`; brain: bool[X, Y, Z]; spacing: mm of
  the grid. Members are `gmm.ensemble` ('channels:K' each; those naming a channel the case lacks are
  skipped and listed), or the one mixture gmm.channels / gmm.k when the ensemble is empty. Each
  member gives its cleaned P (pseudo_label); P is the voxels at least `gmm.vote` of the members
  mark, then its components below keep_fraction x the largest are dropped (and, with gmm.edge_mm,
  those lying mostly within that many mm of the brain's edge), it grows by
  `gmm.grow_mm`, and enclosed holes are filled. A mixture's lesion component is wrong in a different
  way for each channel set and K (grey matter in one, a bright rim in another), so a majority keeps
  what they agree on. Lesion evidence (min_contrast) is judged on the voted mask, before growing.
  """
  t0 = time.time()
  specs = [parse_member(m) for m in gcfg.ensemble] or [(tuple(gcfg.channels), int(gcfg.k))]
  usable = [(ch, k) for ch, k in specs if all(c in modalities for c in ch) and
            gcfg.lesion_channel in ch]
  skipped = [f'{",".join(ch)}:{k}' for ch, k in specs if (ch, k) not in usable]
  if not usable:
    raise ValueError(
        f'no gmm member can be fitted: members {list(gcfg.ensemble) or [gcfg.channels]}'
        f' need channels (and lesion channel {gcfg.lesion_channel!r}) among the '
        f'prepared modalities {modalities}')
  member_cfg = gcfg.copy_and_resolve_references()
  posts, masks, members = [], [], []
  for ch, k in usable:
    member_cfg.k = k
    post, p, rep = pseudo_label(image, brain, [modalities.index(c) for c in ch],
                                list(ch).index(gcfg.lesion_channel), member_cfg, case_id, hu_scale,
                                channel_names=list(ch))
    posts.append(post)
    masks.append(p > 0)
    members.append({'channels': list(ch), **{key: rep.get(key) for key in (
        'k', 'status', 'converged', 'lesion_components', 'means', 'weights', 'contrast',
        'lesion_voxels', 'seconds') if key in rep}})
  lesion = image[..., modalities.index(gcfg.lesion_channel)]
  voted = np.mean(masks, axis=0) >= gcfg.vote - 1e-9 if len(masks) > 1 else masks[0]
  voted = morphology.keep_major(voted, gcfg.keep_fraction)
  if gcfg.get('edge_mm', 0.0) > 0:  # what brain extraction left at the edge is not a lesion
    voted = morphology.drop_edge_components(voted.astype(np.float32), np.zeros_like(voted), brain,
                                            spacing, gcfg.edge_mm) > 0.5
  contrast = ring_contrast(lesion, voted, brain, gcfg.ring_voxels)
  p = morphology.grow(voted, gcfg.grow_mm, spacing)
  p = (morphology.fill_holes(p) if gcfg.fill_holes else p) & brain
  status = 'ok'
  if p.any() and contrast < gcfg.min_contrast:
    status = 'no_lesion_evidence'  # the voted lesion is ordinary tissue: a lesion-free scan
    p = np.zeros_like(p)
  post = consistent_posterior(np.mean(posts, axis=0), p, gcfg.threshold)
  report = {'status': status, 'members': members, 'skipped_members': skipped,
            'contrast': contrast, 'voted_voxels': int(voted.sum()),
            'member_agreement': member_agreement(masks, voted),
            'lesion_voxels': int(p.sum()), 'brain_voxels': int(brain.sum()),
            'lesion_fraction': float(p.sum() / max(int(brain.sum()), 1)),
            'seconds': time.time() - t0}
  if len(members) == 1:  # the single mixture's own fields, as before there was a consensus
    report.update({k: v for k, v in members[0].items() if k not in report})
  return post, p.astype(np.uint8), report


def ring_contrast(x: np.ndarray, mask: np.ndarray, brain: np.ndarray, width: int) -> float:
  """Mean of `x` inside `mask` minus its mean in the brain ring of `width` voxels around the mask
  (x: f32[X, Y, Z] lesion channel; NaN for an empty mask or ring).

  A lesion stands out from the tissue right around it; the brightest component of a lesion-free
  brain (grey matter, a bright rim) is interleaved with tissue of almost its own intensity.
  """
  mask = np.asarray(mask, bool)
  if not mask.any() or width <= 0:
    return float('nan')
  ring = ndimage.binary_dilation(mask, iterations=width) & ~mask & brain
  if not ring.any():
    return float('nan')
  return float(x[mask].mean() - x[ring].mean())


def consistent_posterior(post: np.ndarray, p: np.ndarray, threshold: float) -> np.ndarray:
  """The posterior moved just across `threshold` where the cleanup changed the decision, so that
  posterior > threshold is P again (and an interpolated posterior maps P to other grids), while
  those voxels no longer count as confident either way."""
  eps = 0.01
  return np.where(p, np.maximum(post, threshold + eps),
                  np.minimum(post, threshold - eps)).astype(np.float32)


def hu_scale(config):
  """CT: (HU at 0, HU per unit) of the prepared [0, 1] window, for the mixture's HU rule; else
  None."""
  if config.data.kind != 'ct':
    return None
  lo, hi = config.data.ct_window
  return (lo, hi - lo)


LANDMARKS = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)  # brain-intensity percentiles (Nyul-Udupa)


def landmarks(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
  """f64[C, len(LANDMARKS)]: each channel's brain-intensity percentiles. image: [X, Y, Z, C]."""
  v = np.asarray(image[np.asarray(brain, bool)], np.float64)
  return np.percentile(v, LANDMARKS, axis=0).T


def standardise(image: np.ndarray, brain: np.ndarray, case_marks, standard) -> np.ndarray:
  """Histogram standardisation (Nyul & Udupa 1999): each channel's intensities mapped piecewise
  linearly so that the case's landmarks (case_marks, f[C, L]) land on the standard ones (f[C, L]:
  the mean landmarks of the run's cases), extrapolated beyond the outer ones with the outer
  segments' slopes; 0 outside the brain. Scans from other sites or scanners then share one
  intensity scale before the mixture is fitted. Returns f32[X, Y, Z, C]."""
  out = np.zeros(image.shape, np.float32)
  inside = np.asarray(brain, bool)
  for ch in range(image.shape[-1]):
    src, dst = np.asarray(case_marks[ch], np.float64), np.asarray(standard[ch], np.float64)
    src = np.maximum.accumulate(src + 1e-6 * np.arange(src.size))  # strictly increasing
    x = np.asarray(image[..., ch], np.float64)[inside]
    y = np.interp(x, src, dst)
    lo, hi = x < src[0], x > src[-1]
    y[lo] = dst[0] + (x[lo] - src[0]) * (dst[1] - dst[0]) / (src[1] - src[0])
    y[hi] = dst[-1] + (x[hi] - src[-1]) * (dst[-1] - dst[-2]) / (src[-1] - src[-2])
    out[..., ch][inside] = y
  return out
