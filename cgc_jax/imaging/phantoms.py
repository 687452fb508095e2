"""Seeded phantoms on real anatomy: the MNI ICBM152 2009 template shipped in nilearn's wheel.

Per subject: a random smooth deformation of the template's grey/white-matter/CSF probability maps,
then either a BraTS-like glioma (necrotic core 1, enhancing rim 4, irregular oedema 2) in 4 MRI
modalities, or 0-3 small CQ500-like haemorrhages (55-85 HU) in CT. Tissue intensities are jittered
per subject; a bias field, partial-volume blur and noise are added, so a Gaussian mixture makes
realistic errors (non-bright necrosis, grey matter / oedema overlap at the bias field's bright end).
Written as NIfTI in the brats layout (MRI) or cq500 layout (CT) and read back by readers.py.
"""
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile

from absl import logging
import nibabel as nib
import numpy as np
from scipy import ndimage

from cgc_jax.core import paths
from cgc_jax.core import store as store_lib

# Mean intensity per tissue (csf, gm, wm, oedema, enhancing, necrosis), relative units.
_MRI_MEANS = {
    'flair': (0.15, 0.58, 0.45, 0.88, 0.80, 0.55),
    't1': (0.20, 0.55, 0.80, 0.45, 0.52, 0.25),
    't1ce': (0.20, 0.55, 0.80, 0.47, 1.05, 0.25),
    't2': (1.00, 0.62, 0.42, 0.85, 0.70, 0.95),
}
_CT_MEANS = (8.0, 40.0, 30.0)  # HU of csf, gm, wm; blood drawn per bleed in 55-85 HU
_CT_NOISE_HU = 5.0


def reader_config(config):
  """A data config that reads the generated phantoms with the brats / cq500 readers."""
  d = config.data.copy_and_resolve_references()
  with d.unlocked():
    if config.data.phantoms.kind == 'ct':
      d.layout, d.kind, d.modalities = 'cq500', 'ct', ('ct',)
      d.filenames = dict(d.filenames, ct='{case}_ct.nii.gz')
      d.label, d.label_values = '{case}_label.nii.gz', (0, 1)
    else:
      d.layout, d.kind = 'brats', 'mri'
      d.label, d.label_values = '{case}_seg.nii.gz', (0, 1, 2, 4)
  return d


def ensure(config, root: str) -> str:
  """Generates the phantoms into `root` unless already there for the same settings.

  Generated phantoms are also kept in a cache shared by every workdir of this user
  ($CGC_JAX_PHANTOM_CACHE, default <cache_dir>/phantoms; 'off' turns it off), under a key of
  the settings, this module's source and the numpy, scipy and nilearn versions: a second workdir
  with the same settings copies them (a second or less) instead of generating them again (about
  5 s for the template, once a process, then about a second a subject on 2 cores). The copies
  are the generator's files byte for byte; a cache that cannot be read or written only costs the
  generation."""
  p = config.data.phantoms
  settings = json.dumps(p.to_dict(), sort_keys=True)
  marker = os.path.join(root, MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      if f.read() == settings:
        return root
  os.makedirs(root, exist_ok=True)
  cached = _cache_entry(settings)
  if cached and _copy_from_cache(cached, root, settings, p):
    logging.info('phantoms: %d %s subjects copied from the cache %s', p.num_subjects, p.kind,
                 cached)
    return root
  logging.info('phantoms: generating %d %s subjects into %s', p.num_subjects, p.kind, root)
  anatomy = _anatomy()
  for i, case_id in enumerate(_case_ids(p)):
    lesion_free = i >= p.num_subjects - p.lesion_free
    rng = np.random.default_rng([p.seed, i])
    vols, label, affine = subject(anatomy, rng, p, lesion_free)
    d = os.path.join(root, case_id)
    os.makedirs(d, exist_ok=True)
    for name, v in vols.items():
      _save(v, affine, os.path.join(d, f'{case_id}_{name}.nii.gz'))
    _save(label, affine, os.path.join(d,
                                      f'{case_id}_{"label" if p.kind == "ct" else "seg"}.nii.gz'))
  store_lib.atomic_write_text(marker, settings)
  if cached:
    _copy_to_cache(root, cached, p)
  return root


MARKER = 'phantoms.json'  # the settings the phantoms beside it were generated with


def _cache_entry(settings: str):
  """The cache folder for phantoms of these settings, or None when the cache is off."""
  root = os.environ.get('CGC_JAX_PHANTOM_CACHE') or os.path.join(paths.cache_dir(), 'phantoms')
  if root == 'off':
    return None
  key = hashlib.sha256(settings.encode())
  with open(os.path.abspath(__file__), 'rb') as f:
    key.update(f.read())
  for dist in ('numpy', 'scipy', 'nilearn'):
    try:
      key.update(f'{dist} {importlib.metadata.version(dist)}'.encode())
    except importlib.metadata.PackageNotFoundError:
      key.update(f'{dist} none'.encode())
  return os.path.join(root, key.hexdigest()[:16])


def _case_ids(p):
  return [f'phantom_{p.kind}_{i:03d}' for i in range(p.num_subjects)]


def _copy_from_cache(cached: str, root: str, settings: str, p) -> bool:
  """Copies a complete cache entry's subjects into `root`, then its marker; False (nothing
  claimed) when the entry is missing, incomplete or unreadable."""
  if not os.path.exists(os.path.join(cached, MARKER)):
    return False
  try:
    with open(os.path.join(cached, MARKER)) as f:
      if f.read() != settings:
        return False
    for d in _case_ids(p):
      shutil.copytree(os.path.join(cached, d), os.path.join(root, d), dirs_exist_ok=True)
  except OSError as e:
    logging.warning('phantoms: the cache %s could not be read (%s); generating them', cached, e)
    return False
  store_lib.atomic_write_text(os.path.join(root, MARKER), settings)
  return True


def _copy_to_cache(root: str, cached: str, p):
  """Publishes `root`'s subjects as the cache entry `cached`: copied into a temporary folder
  beside it, which is then renamed (another process publishing the same entry first wins)."""
  parent = os.path.dirname(cached)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.tmp-', dir=parent)
    try:
      for d in _case_ids(p):
        shutil.copytree(os.path.join(root, d), os.path.join(tmp, d))
      shutil.copyfile(os.path.join(root, MARKER), os.path.join(tmp, MARKER))
      os.rename(tmp, cached)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError as e:
    if not os.path.isdir(cached):
      logging.warning('phantoms: not kept in the cache %s (%s)', cached, e)


def _save(v, affine, path):
  tmp = path[:-7] + '.tmp.nii.gz'
  nib.save(nib.Nifti1Image(v, affine), tmp)
  os.replace(tmp, path)


@functools.lru_cache(maxsize=1)
def _anatomy():
  """The template's tissue fractions at 2 mm, read-only, loaded once a process (nilearn resamples
  its 1 mm files on every load: about 5 s)."""
  from nilearn import datasets  # pylint: disable=g-import-not-at-top
  t1 = datasets.load_mni152_template(resolution=2)
  gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), np.float32)
  wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), np.float32)
  mask = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata(), np.float32) > 0
  gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
  csf = np.where(mask, np.clip(1.0 - gm - wm, 0, 1), 0).astype(np.float32)
  out = {'gm': gm * mask, 'wm': wm * mask, 'csf': csf, 'mask': mask.astype(np.float32),
         'affine': np.array(t1.affine)}
  for v in out.values():
    v.setflags(write=False)
  return out


def _smooth_noise(rng, shape, coarse=6):
  """Smooth random field in [-1, 1]-ish: coarse Gaussian noise upsampled with cubic splines.

  The upsampling is `ndimage.zoom(small, zooms, order=3)` done one axis at a time: a cubic spline
  zoom is a tensor product, so each axis is a matrix whose column j is the 1-D zoom of the j-th
  unit vector (scipy's own spline and boundary rule). Equal to the 3-D zoom to float64 rounding
  (one float32 ulp in about one voxel of a million) and 30-80x faster on a head-sized grid.
  """
  small = rng.standard_normal([max(2, s // coarse) for s in shape]).astype(np.float32)
  axes = [ndimage.zoom(np.eye(c), (s / c, 1), order=3) for s, c in zip(shape, small.shape)]
  field = np.einsum('ai,bj,ck,ijk->abc', *axes, small.astype(np.float64), optimize=True)
  return field[:shape[0], :shape[1], :shape[2]].astype(np.float32)


def _deform(anatomy, rng, amplitude_vox):
  shape = anatomy['mask'].shape
  grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing='ij')
  coords = [g + amplitude_vox * _smooth_noise(rng, shape, 12) for g in grid]
  return {k: ndimage.map_coordinates(anatomy[k], coords, order=1, mode='constant')
          for k in ('gm', 'wm', 'csf', 'mask')}


def _tumour(rng, tissue, shape, radius=(5.0, 11.0), side=0):
  """Fractions (oedema, enhancing, necrosis) of an irregular glioma, or zeros if it misses the
  brain. radius: the oedema's semi-axes are drawn in this range (voxels of 2 mm); side: -1 / +1
  puts its centre in the left / right hemisphere (by the template's middle x), 0 anywhere."""
  wm_idx = np.argwhere(tissue['wm'] > 0.6)
  if side:
    mid = shape[0] / 2.0
    wm_idx = wm_idx[(wm_idx[:, 0] < mid) if side < 0 else (wm_idx[:, 0] >= mid)]
  centre = wm_idx[rng.integers(len(wm_idx))].astype(np.float32)
  radii = rng.uniform(radius[0], radius[1], 3).astype(np.float32)  # voxels (2 mm) of the oedema
  grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing='ij')
  d = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)))
  d = d * (1.0 + 0.25 * _smooth_noise(rng, shape, 5))
  core = rng.uniform(0.35, 0.6)
  oed = np.clip((1.0 - d) * 3 + 0.5, 0, 1)  # soft edge: partial volume
  act = np.clip((core - d) * 6 + 0.5, 0, 1)
  nec = np.clip((core * rng.uniform(0.4, 0.75) - d) * 6 + 0.5, 0, 1)
  brain = tissue['mask'] > 0.5
  return oed * brain, act * brain, nec * brain


def subject(anatomy, rng, p, lesion_free):
  """One phantom subject -> ({modality: f32 or i16 volume}, u8 label, affine)."""
  tissue = _deform(anatomy, rng, p.deform_mm / 2.0)
  make = ct_subject if p.kind == 'ct' else mri_subject
  vols, label = make(tissue, rng, p, lesion_free)
  return to_spacing(vols, label, np.asarray(anatomy['affine'], np.float64), tissue['mask'] > 0.5,
                    p)


def ct_subject(tissue, rng, p, lesion_free):
  """A CQ500-like CT: ({'ct': i16 HU volume}, u8 label) from tissue fractions on the 2 mm template.

  0 (lesion-free) or 1-3 bleeds of 55-85 HU; label = blood fraction > 0.5; CSF/GM/WM at their HU
  means (jittered per subject), blurred by p.blur voxels, Gaussian noise, -1024 outside the brain;
  with p.ct_rim_hu > 0, patches of the brain's outer 4 mm at that HU (_rim), never
  labelled.
  """
  shape = tissue['mask'].shape
  brain = tissue['mask'] > 0.5
  frac = [tissue['csf'], tissue['gm'], tissue['wm']]
  blood = np.zeros(shape, np.float32)
  n = 0 if lesion_free else int(rng.integers(1, 4))
  bleeds = []
  for _ in range(n):
    _, act, _ = _tumour(rng, tissue, shape)
    small = ndimage.zoom(act, 1.0, order=0)
    blood = np.maximum(blood, small * (rng.uniform(0.25, 0.5)))
    bleeds.append(rng.uniform(55, 85))
  blood = np.clip(blood / max(blood.max(), 1e-6), 0, 1) if n else blood
  label = (blood > 0.5).astype(np.uint8)
  rest = 1.0 - blood
  hu_blood = float(np.mean(bleeds)) if bleeds else 70.0
  means = [m + rng.normal(0, 1.5) for m in _CT_MEANS]
  ct = sum(f * rest * m for f, m in zip(frac, means)) + blood * hu_blood
  ct = ndimage.gaussian_filter(ct, p.blur) + rng.normal(0, _CT_NOISE_HU, shape)
  if p.get('ct_rim_hu', 0.0) > 0:  # drawn last: the phantoms without a rim are unchanged
    ct = np.where(_rim(brain, rng), p.ct_rim_hu + rng.normal(0, _CT_NOISE_HU, shape), ct)
  ct = np.where(brain, ct, -1024.0)
  return {'ct': np.round(ct).astype(np.int16)}, label


def _rim(brain: np.ndarray, rng) -> np.ndarray:
  """What brain extraction leaves of the skull and dura on a CT: bool mask of patches (a fifth) of
  the brain's outermost voxel layer (2 mm on the 2 mm template)."""
  shell = brain & ~ndimage.binary_erosion(brain)
  field = _smooth_noise(rng, brain.shape, 8)
  return shell & (field > np.quantile(field[shell], 0.8))


def brats_label(oed, act, nec, brain) -> np.ndarray:
  """BraTS labels (u8) from nested tumour fractions: 2 oedema, 4 enhancing, 1 necrosis where each
  fraction is > 0.5 inside the brain (later ones overwrite: necrosis inside enhancing inside
  oedema), 0 elsewhere."""
  label = np.zeros(oed.shape, np.uint8)
  label[(oed > 0.5) & brain] = 2
  label[(act > 0.5) & brain] = 4
  label[(nec > 0.5) & brain] = 1
  return label


def mri_subject(tissue, rng, p, lesion_free):
  """A BraTS-like MRI: ({modality: f32 volume}, u8 label) from tissue fractions on the template.

  Each modality mixes the tissue and tumour-part means of _MRI_MEANS (jittered per subject) by
  their fractions, then partial-volume blur, a smooth multiplicative bias field, Gaussian noise;
  0 outside the brain, x1000.
  """
  shape = tissue['mask'].shape
  brain = tissue['mask'] > 0.5
  frac = [tissue['csf'], tissue['gm'], tissue['wm']]
  if lesion_free:
    oed = act = nec = np.zeros(shape, np.float32)
  elif int(p.get('lesions', 1)) <= 1:
    oed, act, nec = _tumour(rng, tissue, shape)
  else:  # several small lesions, alternating between the hemispheres
    parts = [_tumour(rng, tissue, shape, tuple(p.lesion_radius), side=1 if j % 2 else -1)
             for j in range(int(p.lesions))]
    oed, act, nec = (np.max(np.stack(f), axis=0) for f in zip(*parts))
  act = np.minimum(act, oed)
  nec = np.minimum(nec, act)
  parts = [oed - act, act - nec, nec]  # exclusive oedema, enhancing, necrosis fractions
  rest = 1.0 - oed
  label = brats_label(oed, act, nec, brain)
  bias = np.exp(p.bias * _smooth_noise(rng, shape, 20))
  vols = {}
  for name, means in _MRI_MEANS.items():
    m = np.asarray(means) * rng.uniform(0.93, 1.07, 6)
    v = sum(f * rest * m[i] for i, f in enumerate(frac)) + sum(
        f * m[3 + i] for i, f in enumerate(parts))
    v = ndimage.gaussian_filter(v.astype(np.float32), p.blur) * bias
    v = v + rng.normal(0, p.noise * m[2], shape)
    v = np.where(brain, np.maximum(v, 1e-3), 0.0) * 1000.0
    vols[name] = v.astype(np.float32)
  return vols, label


def to_spacing(vols, label, affine, brain, p):
  """Resamples a 2 mm subject to p.spacing (linear images, nearest label; MRI zero outside the
  brain again) and scales the affine's voxel axes to match. At 2 mm: returned as given."""
  spacing = np.asarray(p.spacing, np.float64)
  if np.allclose(spacing, 2.0):
    return vols, label, affine
  zoom = 2.0 / spacing
  vols = {k: ndimage.zoom(v, zoom, order=1).astype(v.dtype) for k, v in vols.items()}
  if p.kind != 'ct':
    for k in vols:
      vols[k] = np.where(ndimage.zoom(brain.astype(np.uint8), zoom, order=0) > 0, vols[k], 0)
  label = ndimage.zoom(label, zoom, order=0)
  return vols, label, affine @ np.diag(list(spacing / 2.0) + [1.0])
