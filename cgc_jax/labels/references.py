"""Ground truth outside the chain: each case's label file in a store of its own
(WORKDIR/references/), read by scoring only (Dice of P and of the network, the analysis Dice of
training tracks, pictures).

A label never enters a prepared image shard, P, a checkpoint or a mask rule, so adding, editing or
removing label files re-scores a finished run: the image shards, P and the networks stay as they
are. A reference shard is made from the label file and the case's prepared shard (its grid); either
changed makes it stale. A label that cannot be read, sits on another grid or holds values outside
data.label_values is a warning naming the file, and the case is not scored; a label file that
disappeared takes its reference with it.

Shard arrays:
  label: u8[X, Y, Z]             on the prepared grid (tracks, pictures)
  label_native: u8[Xc, Yc, Zc]   the cropped canonical grid at native spacing: geometry.to_original
                                 maps it back to the original label exactly (evaluation)
"""
import os
import shutil

from absl import logging
import numpy as np

from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import geometry
from cgc_jax.imaging import metrics
from cgc_jax.imaging import readers
from cgc_jax.runtime import bookkeeping
from cgc_jax.runtime import workers


def arrays(label: np.ndarray, geom: geometry.Geometry) -> dict:
  """The reference arrays of a label on its case's original grid (u8[X, Y, Z], 1 = lesion)."""
  native, _, _ = geometry.to_canonical(label[geometry.original_box(geom)],
                                       np.asarray(geom.original_affine))
  return {'label': geometry.resample_cropped(native, geom, order=0), 'label_native': native}


def reference_case(case_id: str, label_path: str, data_cfg, prep_root: str, prep_fp: str,
                   out_root: str, out_fp: str, inputs: dict) -> dict:
  """Reads, checks and stores one case's label; returns {'warnings': [...]} (no shard when the
  label is unusable: a stale one is removed, so the case is not scored by an old label)."""
  prep = store_lib.Store(prep_root, prep_fp)
  meta = prep.meta(case_id)
  geom = geometry.Geometry.from_json(meta['geometry'])
  ref_path = meta['files']['images'][meta['modalities'][0]]
  hdr = meta.get('header', {})
  spatial = bool(hdr.get('qform_code') or hdr.get('sform_code'))
  ref = (np.broadcast_to(np.zeros((), np.uint8), tuple(geom.original_shape)),
         np.asarray(geom.original_affine), geom.original_spacing, None)
  label, problems = readers.load_label(label_path, ref, ref_path, spatial, data_cfg)
  out = store_lib.Store(out_root, out_fp)
  if label is None:
    shutil.rmtree(out.case_dir(case_id), ignore_errors=True)
    return {'warnings': [str(p) for p in problems]}
  a = arrays(label, geom)
  outside = int(label.sum()) - int(a['label_native'].sum())
  warnings = [str(p) for p in problems]
  if outside:
    warnings.append(f'{label_path}: {outside} lesion voxels lie outside the brain box')
  out.write(case_id, a, {'inputs': inputs, 'file': label_path, 'warnings': warnings})
  return {'warnings': warnings}


def case_inputs(prep: store_lib.Store, case_id: str, label_path: str) -> dict:
  """What a reference is made from: the label file (path, size, mtime) and the prepared shard."""
  return {'label': store_lib.file_identity([label_path]), 'prepared': prep.identity(case_id)}


def update(config, workdir: str, files: list, data_cfg) -> list:
  """Brings WORKDIR/references/ in line with the label files of `files` (the dataset's
  readers.CaseFiles; data_cfg: the reader config they were found with) whose case is prepared;
  returns the cases with a usable reference. Cheap when nothing changed (file stats and shard
  identities only)."""
  prep = paths.prepared_store(config, workdir)
  out = paths.reference_store(config, workdir)
  ready = set(prep.complete_cases())
  labelled = {f.case_id: f.label for f in files if f.label and f.case_id in ready}
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  if distributed.is_main():  # a label file removed: its reference goes too
    for c in sorted(set(_stored(out)) - set(labelled)):
      logging.info('references: %s has no label file any more: its score is dropped', c)
      shutil.rmtree(out.case_dir(c), ignore_errors=True)
  inputs = {c: case_inputs(prep, c, p) for c, p in labelled.items()}
  todo = bookkeeping.start_cases(config, out, sorted(labelled), 'references', inputs)
  jobs = [(c, (c, labelled[c], data_cfg, prep.root, prep.fingerprint, out.root, out.fingerprint,
               inputs[c])) for c in todo]
  results = workers.map_cases(reference_case, jobs, config.data.num_workers, 'references')
  return bookkeeping.finish_cases(config, out, sorted(labelled), results, 'references', inputs)


def _stored(out: store_lib.Store) -> list:
  d = os.path.join(out.root, 'cases')
  return [c for c in os.listdir(d) if not c.startswith('.')] if os.path.isdir(d) else []


def p_threshold(config) -> float:
  """The stored posterior above which a voxel is in P: gmm.threshold for the mixture, else 0.5."""
  return config.gmm.threshold if config.pseudo_labels.source == 'gmm' else 0.5


def p_scores(config, prep: store_lib.Store, out: store_lib.Store, refs: store_lib.Store,
             cases: list) -> dict:
  """{case: metrics.all_metrics of P against the case's ground truth} for the cases with both, on
  the original grid (P = the stored posterior above p_threshold; out: the pseudo-label store).
  Cached in out's scores.json by (P shard identity, reference identity): a label added or edited is
  scored without touching P."""
  cache = store_lib.CaseCache(os.path.join(out.root, 'scores.json'))
  res = {}
  for c in cases:
    if not (refs.is_complete(c) and out.is_complete(c)):
      continue
    key = [out.identity(c), refs.identity(c)]
    res[c] = cache.get(c, key)
    if res[c] is None:
      geom = geometry.Geometry.from_json(prep.meta(c)['geometry'])
      mask = geometry.prob_to_original_mask(np.asarray(out.read(c, 'posterior'), np.float32),
                                            geom, p_threshold(config))
      ref = geometry.to_original(np.asarray(refs.read(c, 'label_native')), geom.native())
      res[c] = metrics.all_metrics(mask, ref, geom.original_spacing)
      cache.put(c, key, res[c])
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  cache.save(distributed.is_main())
  return res
