"""The pseudo_labels stage: P (u8) and its posterior per case, from the configured source.

Sources (config.pseudo_labels.source): gmm (default), threshold (lesion-channel z-score > k),
nifti (masks of another method, on each case's original grid), ground_truth (upper bound).
Shard arrays (prepared grid): p: u8[X, Y, Z]; posterior: f16[X, Y, Z]. Each shard's meta holds the
per-case report (also written to pseudo_labels/reports/<case>.json).
"""
import hashlib
import os

from absl import logging
import numpy as np

from cgc_jax import errors
from cgc_jax.core import compat
from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import geometry
from cgc_jax.imaging import metrics
from cgc_jax.imaging import morphology
from cgc_jax.imaging import nifti
from cgc_jax.labels import gmm
from cgc_jax.labels import references
from cgc_jax.runtime import bookkeeping
from cgc_jax.runtime import workers




def _from_nifti(path, geom: geometry.Geometry):
  if not os.path.exists(path):
    raise errors.DataError(f'{path}: no mask for this case in pseudo_labels.nifti_dir')
  problems = []
  v = nifti.load_volume(path, problems)
  if v is None:
    raise errors.DataError('\n'.join(str(p) for p in problems))
  data, affine, _, _ = v
  if data.shape != tuple(geom.original_shape):
    raise errors.DataError(f'{path}: shape {data.shape} is not the case\'s {geom.original_shape}')
  if not np.allclose(affine, np.asarray(geom.original_affine), atol=1e-3):
    raise errors.DataError(f'{path}: affine differs from the case\'s original affine')
  canon, _, _ = geometry.to_canonical((data > 0).astype(np.uint8), affine)
  return geometry.crop_and_resample(canon, geom, order=0).astype(np.float32)


def case_pseudo_label(case_id, config, prep_root, prep_fp, out_root, out_fp, ref_root, inputs,
                      standard=None):
  """Computes and writes one case's P shard; returns its report. ref_root: the reference store
  (read by source=ground_truth only); standard: f[C, L] landmarks to standardise the image to
  before the mixture (gmm.standardise; standard_landmarks), or None."""
  prep = store_lib.Store(prep_root, prep_fp)
  meta = prep.meta(case_id)
  geom = geometry.Geometry.from_json(meta['geometry'])
  image = np.asarray(prep.read(case_id, 'image', config.data.verify_checksums), np.float32)
  brain = np.asarray(prep.read(case_id, 'brain', config.data.verify_checksums)) > 0
  src = config.pseudo_labels.source
  label = None
  if src == 'ground_truth':
    refs = store_lib.Store(ref_root, prep_fp)
    if not refs.is_complete(case_id):
      raise errors.DataError(
          f'{case_id}: pseudo_labels.source=ground_truth but the case has no usable label')
    label = np.asarray(refs.read(case_id, 'label'))
  if standard is not None:
    image = gmm.standardise(image, brain, gmm.landmarks(image, brain), standard)
  post, p, report = labels_from_source(config, case_id, image, brain, list(meta['modalities']),
                                       geom, label=label)
  report['source'] = src
  post = post.astype(np.float16).astype(np.float32)  # what is stored: export that
  out = store_lib.Store(out_root, out_fp)
  if config.pseudo_labels.export_nifti:
    nifti.write_mask(original_mask(config, post, geom), geom, meta, export_path(out_root, case_id))
  os.makedirs(os.path.join(out_root, 'reports'), exist_ok=True)
  store_lib.atomic_write_json(os.path.join(out_root, 'reports', f'{case_id}.json'), report)
  out.write(case_id, {'p': p.astype(np.uint8), 'posterior': post.astype(np.float16)},
            {'report': report, 'inputs': inputs})
  return report


def standard_landmarks(config, prep: store_lib.Store, out: store_lib.Store, cases: list):
  """With gmm.standardise (MRI, source gmm): f64[C, L] the mean over `cases` of their channels'
  brain-intensity landmarks (gmm.landmarks; cached per prepared shard in landmarks.json), else
  None."""
  if not (config.gmm.get('standardise', False) and config.pseudo_labels.source == 'gmm' and
          config.data.kind != 'ct'):
    return None
  cache = store_lib.CaseCache(os.path.join(out.root, 'landmarks.json'))
  marks = []
  for c in cases:
    key = prep.identity(c)
    m = cache.get(c, key)
    if m is None:
      image = np.asarray(prep.read(c, 'image'), np.float32)
      m = gmm.landmarks(image, np.asarray(prep.read(c, 'brain')) > 0).tolist()
      cache.put(c, key, m)
    marks.append(m)
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  os.makedirs(out.root, exist_ok=True)
  cache.save(distributed.is_main())
  return np.mean(np.asarray(marks, np.float64), axis=0)


def labels_from_source(config, case_id: str, image: np.ndarray, brain: np.ndarray, mods: list,
                       geom, label=None) -> tuple:
  """One case's P from pseudo_labels.source: (posterior [X,Y,Z] f32, P [X,Y,Z] u8, report dict).

  image: [X,Y,Z,C] f32 prepared channels (`mods` names them); brain: [X,Y,Z] bool; label: the
  prepared ground truth, needed by source=ground_truth only. gmm: the mixture consensus
  (gmm.consensus, whose report it returns); threshold: lesion-channel z-score above
  pseudo_labels.threshold_z, components below gmm.min_component_voxels dropped; nifti: the mask
  file <nifti_dir>/<case>.nii.gz on the prepared grid; ground_truth: label > 0.
  """
  src, g = config.pseudo_labels.source, config.gmm
  if src == 'gmm':
    return gmm.consensus(image, brain, mods, g, case_id, geom.spacing,
                         hu_scale=gmm.hu_scale(config))
  if src == 'threshold':
    post = (threshold_z(image[..., mods.index(g.lesion_channel)], brain) >
            config.pseudo_labels.threshold_z).astype(np.float32)
    p = morphology.remove_small(post > 0.5, g.min_component_voxels).astype(np.uint8)
  elif src == 'nifti':
    post = _from_nifti(os.path.join(config.pseudo_labels.nifti_dir, f'{case_id}.nii.gz'), geom)
    p = (post > 0.5).astype(np.uint8)
  elif src == 'ground_truth':
    post = (np.asarray(label) > 0).astype(np.float32)
    p = post.astype(np.uint8)
  else:
    raise ValueError(
        f'unknown pseudo_labels.source {src!r} (gmm | threshold | nifti | ground_truth)')
  return post, p, {'status': 'ok', 'lesion_fraction': float(p.sum() / max(brain.sum(), 1))}


def original_mask(config, post, geom) -> np.ndarray:
  """P on the case's original grid (u8) from its stored posterior on the prepared grid."""
  return geometry.prob_to_original_mask(post, geom, references.p_threshold(config))


def export_path(out_root: str, case_id: str) -> str:
  return os.path.join(out_root, 'nifti', f'{case_id}.nii.gz')


def export_missing(config, prep: store_lib.Store, out: store_lib.Store, cases: list) -> int:
  """With pseudo_labels.export_nifti, writes the NIfTI of every finished case that lacks one (the
  switch turned on after P was made: no mixture is refitted). Returns how many were written."""
  n = 0
  for c in cases if config.pseudo_labels.export_nifti else ():
    if not os.path.exists(export_path(out.root, c)):
      meta = prep.meta(c)
      geom = geometry.Geometry.from_json(meta['geometry'])
      post = np.asarray(out.read(c, 'posterior'), np.float32)
      nifti.write_mask(original_mask(config, post, geom), geom, meta, export_path(out.root, c))
      n += 1
  return n


def expected_inputs(config, prep: store_lib.Store, out: store_lib.Store, case_id: str,
                    refs=None) -> dict:
  """case_inputs(), or what an existing P shard recorded when that names the same prepared shard
  by the identity formula of earlier versions (store.Store.legacy_identity): such a shard is
  current, not redone."""
  meta = out.meta(case_id, missing_ok=True)
  return compat.p_inputs(case_inputs(config, prep, case_id, refs), meta and meta.get('inputs'),
                         prep.legacy_identity(case_id))


def case_inputs(config, prep: store_lib.Store, case_id: str, refs=None) -> dict:
  """What a case's P is made from: its prepared shard (by content), for source=nifti the mask file,
  and for source=ground_truth its reference (refs: the reference store). A redone prepared case or
  a replaced mask makes the P shard stale."""
  out = {'prepared': prep.identity(case_id)}
  src = config.pseudo_labels.source
  if src == 'nifti':
    out['mask'] = store_lib.file_identity(
        [os.path.join(config.pseudo_labels.nifti_dir, f'{case_id}.nii.gz')])
  if src == 'ground_truth' and refs is not None and refs.is_complete(case_id):
    out['reference'] = refs.identity(case_id)
  return out


def threshold_z(x, brain):
  """f32[X, Y, Z] z-score of x over the brain voxels (0 outside; std 0 guarded). The prepared MRI
  channel is already a brain z-score (this is then the identity up to float16 rounding); CT is
  HU-windowed to [0, 1] and needs it."""
  x = np.asarray(x, np.float32)
  v = x[brain]
  if v.size == 0:
    return np.zeros_like(x)
  return np.where(brain, (x - v.mean()) / max(float(v.std()), 1e-6), 0.0).astype(np.float32)


def run(config, workdir) -> list:
  """The pseudo_labels stage over all prepared cases; logs the "GMM w/ threshold" row."""
  prep = paths.prepared_store(config, workdir)
  cases = prep.complete_cases()
  if not cases:
    raise errors.StageError(f'{prep.root}: no prepared cases: run --mode=prepare first')
  out = paths.pl_store(config, workdir)
  refs = paths.reference_store(config, workdir)  # made by the prepare stage
  logging.info('pseudo_labels: source %s', config.pseudo_labels.source)
  inputs = {c: expected_inputs(config, prep, out, c, refs) for c in cases}
  standard = standard_landmarks(config, prep, out, cases)
  if standard is not None:  # every case's P depends on the run's standard
    digest = hashlib.sha256(np.round(standard, 4).tobytes()).hexdigest()[:16]
    inputs = {c: dict(v, standard=digest) for c, v in inputs.items()}
  todo = bookkeeping.start_cases(config, out, cases, 'pseudo_labels', inputs)
  jobs = [(c, (c, config, prep.root, prep.fingerprint, out.root, out.fingerprint, refs.root,
               inputs[c], standard)) for c in todo]
  results = workers.map_cases(case_pseudo_label, jobs, config.data.num_workers, 'pseudo_labels',
                               expected_types=(errors.DataError, gmm.GMMError))
  done = bookkeeping.finish_cases(config, out, cases, results, 'pseudo_labels', inputs)
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  if not distributed.is_main():  # process 0 logs and writes the summary
    return done
  rows = []
  for c, m in references.p_scores(config, prep, out, refs, done).items():
    rows.append(dict(case=c, **m))
    logging.info('P %s: dice %.4f sens %.4f assd %.2f mm', c, m['dice'], m['sensitivity'],
                 m['assd'])
  if rows:
    s = metrics.summarise(rows)
    logging.info(
        'P (%s) vs ground truth over %d cases: Dice %.4f +- %.4f, sensitivity %.4f +- %.4f, '
        'ASSD %.2f +- %.2f mm', config.pseudo_labels.source, len(rows), s['dice']['mean'],
        s['dice']['std'], s['sensitivity']['mean'], s['sensitivity']['std'], s['assd']['mean'],
        s['assd']['std'])
    store_lib.atomic_write_json(os.path.join(out.root, 'summary.json'),
                                {'rows': rows, 'summary': s})
  elif os.path.exists(os.path.join(out.root, 'summary.json')):  # every label removed
    os.remove(os.path.join(out.root, 'summary.json'))
  n = export_missing(config, prep, out, done)
  if n:
    logging.info('pseudo_labels: exported %d NIfTI masks that were missing', n)
  return done


def load_reports(config, workdir) -> dict:
  out = paths.pl_store(config, workdir)
  return {c: out.meta(c)['report'] for c in out.complete_cases()}
