"""Foreground-background determination: a per-case Gaussian mixture over brain voxels.

Fit on a seeded subsample (scikit-learn, full covariance, k-means initialisation computed once from
the subsample so that a fit on all voxels can start from the same point), then posteriors for every
brain voxel in one vectorised pass. Deterministic for a given seed, config and case id.
"""
import time
import warnings
import zlib

import numpy as np
from scipy import ndimage
from sklearn import cluster
from sklearn import mixture
from sklearn.exceptions import ConvergenceWarning


class GMMError(Exception):
  """The mixture could not be fitted; the message names the case."""


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


def fit(x: np.ndarray, k: int, seed: int, gcfg, init=None):
  """Fits a full-covariance mixture on `x: f32[N, D]`; returns (model, info). Retries on failure.

  Singular covariance raises the regulariser x10; non-convergence re-seeds (recorded in info).
  """
  reg = gcfg.reg_covar
  info = {'attempts': []}
  for attempt in range(gcfg.retries + 1):
    s = seed + 7919 * attempt
    try:
      p = init if (init is not None and attempt == 0) else initial_params(x, k, s, reg,
                                                                           gcfg.kmeans_inits)
      gm = mixture.GaussianMixture(k, covariance_type='full', reg_covar=reg, max_iter=gcfg.max_iter,
                                   tol=gcfg.tol, random_state=s, **p)
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', ConvergenceWarning)
        gm.fit(x)
    except (ValueError, np.linalg.LinAlgError) as e:
      info['attempts'].append({'seed': s, 'reg_covar': reg, 'error': str(e)[:200]})
      reg = max(reg * 10.0, 1e-6)
      continue
    info['attempts'].append({'seed': s, 'reg_covar': reg, 'converged': bool(gm.converged_),
                             'iterations': int(gm.n_iter_)})
    if gm.converged_:
      info.update(seed=s, reg_covar=reg, converged=True, iterations=int(gm.n_iter_))
      return gm, info
  raise GMMError(f'mixture did not converge after {gcfg.retries + 1} attempts '
                 f'({info["attempts"]}); try a larger gmm.max_iter, gmm.tol or gmm.reg_covar')


def lesion_components(means: np.ndarray, gcfg, lesion_col: int, hu_scale=None) -> list:
  """Indices of the lesion component(s) under the configured rule."""
  if gcfg.rule == 'max_mean':
    return [int(np.argmax(means[:, lesion_col]))]
  if gcfg.rule == 'hu_range':
    lo, hi = gcfg.hu_range
    hu = means[:, lesion_col] if hu_scale is None else hu_scale[0] + means[:, lesion_col] * hu_scale[1]
    return [int(j) for j in np.nonzero((hu >= lo) & (hu <= hi))[0]]
  raise ValueError(f'unknown gmm.rule {gcfg.rule!r} (max_mean | hu_range)')


def remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
  if min_voxels <= 0 or not mask.any():
    return mask
  lab, n = ndimage.label(mask)
  sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
  keep = np.zeros(n + 1, bool)
  keep[1:] = sizes >= min_voxels
  return keep[lab]


def pseudo_label(image: np.ndarray, brain: np.ndarray, channels: list, lesion_channel: int, gcfg,
                 case_id: str, hu_scale=None, full_fit: bool = False):
  """Per-case GMM -> (posterior f32[X, Y, Z], P u8[X, Y, Z], report dict).

  image: f32[X, Y, Z, C] normalised; brain: bool[X, Y, Z]; channels: indices used as features;
  lesion_channel: index into `channels`. full_fit=True fits on ALL brain voxels (benchmark only).
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
  sub = x_all if n <= gcfg.subsample else x_all[np.sort(rng.choice(n, gcfg.subsample, replace=False))]
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
  gm, info = fit(x_all if full_fit else sub, k, seed, gcfg, init=init)
  if not full_fit and sub.shape[0] < n and gcfg.refine_iters > 0:
    # A few EM iterations on ALL brain voxels from the subsample optimum: cheap (a full fit needs
    # tens of iterations from k-means), and it moves the fit onto the full-data optimum.
    gm.set_params(warm_start=True, max_iter=gcfg.refine_iters, tol=0.0)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', ConvergenceWarning)
      gm.fit(x_all)
    info['refine_iters'] = int(gcfg.refine_iters)
  comps = lesion_components(gm.means_, gcfg, lesion_channel, hu_scale)
  resp = gm.predict_proba(x_all)
  post[brain] = resp[:, comps].sum(1) if comps else 0.0
  p = remove_small(post > gcfg.threshold, gcfg.min_component_voxels)
  report.update(status='ok', **info, lesion_components=comps, means=gm.means_.tolist(),
                weights=gm.weights_.tolist(), lesion_fraction=float(p.sum() / n),
                lesion_voxels=int(p.sum()), seconds=time.time() - t0)
  return post, p.astype(np.uint8), report
