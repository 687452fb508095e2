"""The prepare stage: verify, reorient, brain-mask, crop, resample, normalise, write shards.

Each case is loaded once; verification (readers.load_case) runs on the loaded arrays before anything
of the case is written, so a bad case writes nothing while good cases in the same run are kept.

Prepared shard arrays (prepared grid = RAS, brain box, target spacing):
  image: f16[X, Y, Z, C]  normalised (MRI z-score in brain; CT window scaled to [0, 1]); 0 outside
  brain: u8[X, Y, Z]
Label files are not read here: references.py keeps them in a store of their own (scoring only), so
a label added, edited or removed never re-prepares a case.
"""
import dataclasses
import os

from absl import logging
import numpy as np

from cgc_jax import errors
from cgc_jax.core import compat
from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import bias_field
from cgc_jax.imaging import dicom
from cgc_jax.imaging import geometry
from cgc_jax.imaging import nifti
from cgc_jax.imaging import readers
from cgc_jax.labels import references
from cgc_jax.runtime import bookkeeping
from cgc_jax.runtime import workers


StageError = errors.StageError  # defined in errors.py (every user-facing error in one place)




def case_files(config, workdir, root=None) -> list:
  """The dataset's cases; layout=phantoms generates them first (once) into WORKDIR/phantoms.
  Without `root` (the workdir's own data), the cases of data.extra_roots follow, with no label
  file (extra_cases); `root` (new scans, --mode=predict) lists that folder only."""
  data = config.data
  if data.layout == 'phantoms' and root:
    return readers.discover(reader_config(config), root)
  if root:
    return readers.discover(data, root)
  if data.layout == 'phantoms':
    from cgc_jax.imaging import phantoms  # pylint: disable=g-import-not-at-top
    from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
    root = os.path.join(workdir, 'phantoms')
    if distributed.is_main():  # one process generates them, the others wait at the barrier
      phantoms.ensure(config, root)
    distributed.sync('phantoms', '', config.dist.barrier_timeout_s)
    files = readers.discover(phantoms.reader_config(config), root)
  else:
    files = readers.discover(data, root)
  return files + extra_cases(config, files)


def extra_cases(config, files: list) -> list:
  """The cases of config.data.extra_roots (each read as the root is: its layout, or the nnU-Net raw
  layout where it has one), label files left out: they join the training pool unlabelled. DataError
  when a case id repeats one already listed (`files` or an earlier extra root), naming both."""
  seen = {f.case_id: _where(f) for f in files}
  out = []
  for extra in config.data.get('extra_roots', ()) or ():
    if not os.path.isdir(extra):
      raise readers.DataError(f'{extra}: data.extra_roots entry does not exist or is not a folder')
    for f in readers.discover(reader_config(config), extra):
      if f.case_id in seen:
        raise readers.DataError(f'{_where(f)}: case id {f.case_id!r} of data.extra_roots entry '
                                f'{extra} is also at {seen[f.case_id]}: case ids must be unique '
                                'across data.root and data.extra_roots')
      seen[f.case_id] = _where(f)
      out.append(dataclasses.replace(f, label=None))
  return out


def _where(f) -> str:
  """The folder of a case's first image (for messages)."""
  first = next(iter(f.images.values()), '')
  return os.path.dirname(first) if os.path.isfile(first) else first


def reader_config(config):
  if config.data.layout == 'phantoms':
    from cgc_jax.imaging import phantoms  # pylint: disable=g-import-not-at-top
    return phantoms.reader_config(config)
  return config.data


def checked_brain(channels: list, data_cfg) -> tuple:
  """geometry.brain_mask, or DataError when it is empty."""
  brain, approximate = geometry.brain_mask(channels, data_cfg)
  if not brain.any():
    raise readers.DataError('empty brain mask (no voxel inside the brain in every channel): '
                            'failed brain extraction?')
  return brain, approximate


def preprocess(channels: list, affine: np.ndarray, data_cfg, brain=None):
  """One case's arrays on its original grid -> (arrays on the prepared grid, Geometry, approximate).

  channels: C arrays f32[X, Y, Z] in data_cfg.modalities order, any orientation; affine: f64[4, 4].
  Returned arrays: image f[X', Y', Z', C] (data_cfg.store_dtype), brain u8.
  `geometry.to_original(..., geom)` maps any prepared-grid array back. brain: (bool[X, Y, Z],
  approximate) from checked_brain, or None to compute it here. Raises DataError on an empty brain
  mask.
  """
  shape = channels[0].shape
  brain, approximate = brain or checked_brain(channels, data_cfg)  # on the original grid
  brain_c, canon_affine, ornt = geometry.to_canonical(brain.view(np.uint8), affine)
  geom = geometry.plan(brain_c > 0, affine, shape, ornt, canon_affine,
                       data_cfg.crop_margin_mm, tuple(data_cfg.target_spacing))
  # crop the original arrays first, then reorient only the box (the same voxels, far less work)
  box = geometry.original_box(geom)
  canon = np.stack([geometry.to_canonical(ch[box], affine)[0] for ch in channels], -1)
  brain_p = geometry.crop_and_resample(brain_c, geom, order=0)
  if data_cfg.get('bias_field', 'none') != 'none' or data_cfg.get('antialias', False):
    inside = brain_c[tuple(slice(a, b) for a, b in zip(geom.crop_start, geom.crop_stop))] > 0
    canon = bias_field.correct(canon, inside, geom.native_spacing, data_cfg)
    if data_cfg.get('antialias', False):
      canon = geometry.antialias(canon, inside, geom)
  image = geometry.resample_cropped(canon, geom, order=1)
  image = geometry.normalise(image, brain_p > 0, data_cfg).astype(data_cfg.store_dtype)
  return {'image': image, 'brain': brain_p}, geom, approximate


def prepare_case(files: readers.CaseFiles, data_cfg, store_root: str, fingerprint: str,
                 write: bool = True) -> dict:
  """Loads, verifies and preprocesses one case; writes its shard unless write=False."""
  lc = readers.load_case(files, data_cfg)
  first = files.images[data_cfg.modalities[0]]
  warnings = [str(w) for w in lc.warnings]
  try:
    brain, approximate = checked_brain(lc.channels, data_cfg)
    problem = None if approximate else geometry.raw_scan_problem(brain, lc.channels, data_cfg)
    if problem and data_cfg.get('strict_brain_mask', False):
      raise readers.DataError(problem + ' (data.strict_brain_mask=True stops here)')
    if problem:
      warnings.append(f'{first}: {problem}')
    if not write:  # verify: the brain mask and the label's checks only
      if files.label:
        _, probs = readers.load_label(files.label, (lc.channels[0], lc.affine, lc.spacing,
                                                    lc.header), first,
                                      nifti.has_spatial_info(lc.header), data_cfg)
        warnings += [str(p) for p in probs]
      return {'warnings': warnings}
    arrays, geom, approximate = preprocess(lc.channels, lc.affine, data_cfg, (brain, approximate))
  except readers.DataError as e:
    raise readers.DataError(f'{first}: {e}') from e
  inputs = case_inputs(files)
  meta = {'geometry': geom.to_json(), 'modalities': list(data_cfg.modalities),
          'inputs': inputs,
          'input_digests': {p: store_lib.content_digest(p) for p in inputs},
          'files': {'images': files.images},
          'approximate_brain': approximate,
          'warnings': warnings,
          'header': {'qform_code': int(lc.header['qform_code']),
                     'sform_code': int(lc.header['sform_code'])}}
  store_lib.Store(store_root, fingerprint).write(files.case_id, arrays, meta)
  return {'warnings': meta['warnings'], 'approximate_brain': approximate,
          'mb': sum(a.nbytes for a in arrays.values()) / 1e6}


def case_inputs(files: readers.CaseFiles) -> dict:
  """The identity of a case's image files (path, size, mtime; a DICOM series folder: each of its
  files): a prepared shard is current only for these. Its label is not among them."""
  paths = []
  for p in files.images.values():
    paths += dicom.series_files(p) if p and os.path.isdir(p) else [p]
  return store_lib.file_identity(paths)


def verify(config, workdir, root=None):
  """--mode=verify: checks every case, writes nothing, raises StageError listing every problem."""
  data_cfg = reader_config(config)
  files = case_files(config, workdir, root)
  jobs = [(f.case_id, (f, data_cfg, '', '', False)) for f in files]
  results = workers.map_cases(prepare_case, jobs, config.data.num_workers, 'verify',
                               expected_types=(readers.DataError,))
  bookkeeping.report_failures(results, 'verify')
  logging.info('verify: %d cases OK', len(files))
  return [f.case_id for f in files]


def run(config, workdir, root=None, store=None) -> list:
  """The prepare stage (and, for the workdir's own data, the reference store of its labels).
  Returns the prepared case ids (complete shards). `store`: another store (--mode=predict's new
  scans, which are never scored)."""
  data_cfg = reader_config(config)
  files = case_files(config, workdir, root)
  own = store is None
  store = store or paths.prepared_store(config, workdir)
  inputs = {f.case_id: compat.prepared_inputs(case_inputs(f), store.meta(f.case_id, True))
            for f in files}
  todo = bookkeeping.start_cases(config, store, [f.case_id for f in files], 'prepare', inputs)
  by_id = {f.case_id: f for f in files}
  jobs = [(c, (by_id[c], data_cfg, store.root, store.fingerprint)) for c in todo]
  results = workers.map_cases(prepare_case, jobs, config.data.num_workers, 'prepare',
                               expected_types=(readers.DataError,))
  try:
    return bookkeeping.finish_cases(config, store, [f.case_id for f in files], results,
                                    'prepare', inputs)
  finally:
    if own:  # the good cases' labels, whatever failed
      references.update(config, workdir, files, data_cfg)


def update_references(config, workdir: str) -> list:
  """The reference store brought in line with the dataset's label files (labels.references):
  before an evaluation, so that labels added, edited or removed since are scored."""
  return references.update(config, workdir, case_files(config, workdir), reader_config(config))
