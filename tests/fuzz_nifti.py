"""A generator of broken NIfTI cases for the reliability catalogue (tests/test_reliability.py).

`write_dataset(root, seed)` writes a folder-layout dataset of small valid cases plus at least 200
cases that each carry one corruption, and returns one `Fuzzed(case_id, kind, path, must_fail)` per
broken case: `path` is the file that was damaged (the one an error must name), `must_fail` is True
when the case must be refused, None when the damage may leave a valid file (random header bytes that
hit unused fields): then a clean load or a clean refusal both count as handled; False when the case
must load with a warning that names the file (a header without spatial information, any damaged
label: ground truth only scores, so the case is prepared without it).
"""
import dataclasses
import gzip
import os
import shutil

import nibabel as nib
import numpy as np

MODALITIES = ('flair', 't1', 't1ce', 't2')
SHAPE = (24, 28, 20)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
GOOD = ('good_0', 'good_1')


@dataclasses.dataclass
class Fuzzed:
  case_id: str
  kind: str
  path: str
  must_fail: object  # True | None


def paths(root, case):
  d = os.path.join(root, case)
  files = {m: os.path.join(d, f'{case}_{m}.nii.gz') for m in MODALITIES}
  files['seg'] = os.path.join(d, f'{case}_seg.nii.gz')
  return files


def _arrays(seed):
  rng = np.random.default_rng(seed)
  x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing='ij')
  brain = x**2 + y**2 + z**2 < 0.8
  lesion = (x - 0.25)**2 + y**2 + (z + 0.1)**2 < 0.08
  vols = {}
  for i, m in enumerate(MODALITIES):
    v = np.where(brain, 100.0 + 20 * i + rng.normal(0, 5, SHAPE), 0.0)
    v[lesion] += 60.0 if m == 'flair' else -20.0
    vols[m] = v.astype(np.float32)
  seg = np.zeros(SHAPE, np.uint8)
  seg[lesion] = 2
  seg[lesion & (x > 0.3)] = 4
  seg[lesion & (x < 0.15)] = 1
  vols['seg'] = seg
  return vols


def _save(arr, path, affine=AFFINE, dtype=None):
  img = nib.Nifti1Image(arr, affine, dtype=dtype)
  img.set_qform(affine, 1)
  img.set_sform(affine, 1)
  nib.save(img, path)


def write_case(root, case, seed):
  os.makedirs(os.path.join(root, case), exist_ok=True)
  arrays = _arrays(seed)
  for key, path in paths(root, case).items():
    _save(arrays[key], path)
  return arrays


def _raw(path):
  with gzip.open(path, 'rb') as f:
    return f.read()


def _write_raw(path, raw):
  with gzip.open(path, 'wb') as f:
    f.write(raw)


def _header_field(path, field, value, **more):
  """Sets fields of the 348-byte NIfTI-1 header in place: value, or (index, value) for arrays."""
  raw = bytearray(_raw(path))
  hdr = np.frombuffer(bytes(raw[:348]), dtype=nib.nifti1.header_dtype).copy()
  for f, v in [(field, value)] + list(more.items()):
    if isinstance(v, tuple):
      hdr[f][0][v[0]] = v[1]
    else:
      hdr[f] = v
  raw[:348] = hdr.tobytes()
  _write_raw(path, bytes(raw))


def write_dataset(root, seed=0) -> list:
  """Writes the good cases and >= 200 broken ones under `root`; returns the broken ones."""
  rng = np.random.default_rng(seed)
  for i, case in enumerate(GOOD):
    write_case(root, case, i)
  out = []

  def new(kind, target, must_fail=True):
    case = f'fz{len(out):03d}_{kind}'
    arrays = write_case(root, case, 100 + len(out))
    p = paths(root, case)
    if target == 'seg' and must_fail:  # a damaged label costs the case its score only
      must_fail = False
    out.append(Fuzzed(case, kind, p[target], must_fail))
    return p[target], arrays, p

  for _ in range(50):  # truncated gzip stream at a random offset
    path, _, _ = new('truncated_gz', rng.choice(MODALITIES + ('seg',)))
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:int(rng.integers(0, len(data) - 1))])
  for _ in range(20):  # valid gzip of a truncated NIfTI (header or voxel data cut)
    path, _, _ = new('truncated_nifti', rng.choice(MODALITIES))
    raw = _raw(path)
    _write_raw(path, raw[:int(rng.integers(0, len(raw) - 1))])
  for value in (0, 1000):  # nibabel repairs a wrong sizeof_hdr when the rest is valid
    path, _, _ = new('header_sizeof_hdr', 'flair', None)
    _header_field(path, 'sizeof_hdr', value)
  for value in (np.inf, np.nan):  # non-finite scale factors mean "no scaling" in NIfTI
    path, _, _ = new('header_scl_slope', 'flair', None)
    _header_field(path, 'scl_slope', value)
  fields = [('magic', b'zz1\0'), ('magic', b'\0\0\0\0'),
            ('dim', (0, 0)), ('dim', (0, 2)), ('dim', (0, 5)), ('dim', (0, 8)), ('dim', (0, 9)),
            ('dim', (0, -1)), ('dim', (1, 0)), ('dim', (1, -3)), ('dim', (2, 30000)),
            ('dim', (3, 0)), ('datatype', 0), ('datatype', 1), ('datatype', 3),
            ('datatype', 32), ('datatype', 128), ('datatype', 1792), ('datatype', 2304),
            ('datatype', 9999), ('vox_offset', 1e9), ('vox_offset', 1e6),
            ('scl_inter', np.nan), ('scl_inter', np.inf),
            ('srow_x', (0, 0.0)), ('srow_z', (2, 0.0)), ('srow_y', (1, np.nan)),
            ('srow_x', (3, np.inf))]
  for field, value in fields:  # one header field set to a bad value
    path, _, _ = new(f'header_{field}', 'flair')
    _header_field(path, field, value)
  for _ in range(40):  # random header bytes: may or may not matter
    path, _, _ = new('header_garbage', rng.choice(MODALITIES + ('seg',)), None)
    raw = bytearray(_raw(path))
    for _ in range(int(rng.integers(1, 9))):
      raw[int(rng.integers(0, 348))] = int(rng.integers(0, 256))
    _write_raw(path, bytes(raw))
  for shape in [(24, 28), (24, 28, 20, 2), (24, 28, 20, 3), (24, 28, 20, 1, 2)]:
    path, _, _ = new(f'dims_{len(shape)}d', 'flair')
    _save(np.ones(shape, np.float32), path)
  for i in range(20):  # NaN / Inf voxels
    m = MODALITIES[i % 2]
    path, arrays, _ = new('nan_inf', m)
    a = arrays[m].copy()
    n = int(rng.integers(1, 30))
    a.flat[rng.choice(a.size, n, replace=False)] = np.nan if i % 3 else np.inf
    _save(a, path)
  for dtype in ('complex64', 'complex128'):
    path, arrays, _ = new(f'dtype_{dtype}', 'flair')
    _save(arrays['flair'].astype(dtype), path)
  for dtype in ('RGB', 'RGBA'):
    path, _, _ = new(f'dtype_{dtype}', 't1')
    fields_ = [(c, 'u1') for c in dtype]
    _save(np.zeros(SHAPE, dtype=fields_), path)
  path, _, _ = new('empty_file', 'flair')
  open(path, 'wb').close()
  for shape in [(0, 28, 20), (24, 0, 20)]:
    path, _, _ = new('zero_size', 't1')
    _save(np.zeros(shape, np.float32), path)
  for changes in ({'srow_x': np.zeros(4, np.float32)},  # sform with a zero column
                  {'sform_code': 0, 'pixdim': (1, 0.0)}):  # qform with a zero voxel size
    path, _, _ = new('affine_zero_scale', 'flair')
    _header_field(path, *next(iter(changes.items())), **dict(list(changes.items())[1:]))
  # no spatial information at all (qform and sform codes 0, a zero pixdim): the case loads with the
  # geometry of its other channels and a warning that names this file
  path, _, _ = new('no_spatial_information', 'flair', must_fail=False)
  _header_field(path, 'sform_code', 0, qform_code=0, pixdim=(3, 0.0))
  for v in (3, 5, 7, 255, 1000, -1, 0.5):
    path, arrays, _ = new('label_values', 'seg')
    seg = arrays['seg'].astype(np.float32)
    seg[seg == 2] = v
    _save(seg, path)
  for axis in range(3):
    for d in (-1, 1):
      path, arrays, _ = new('shape_mismatch', 't1')
      shape = list(SHAPE)
      shape[axis] += d
      _save(np.resize(arrays['t1'], shape), path)
  for d in (-1, 1):
    path, arrays, _ = new('label_shape_mismatch', 'seg')
    _save(np.resize(arrays['seg'], (SHAPE[0] + d,) + SHAPE[1:]), path)
  path, _, _ = new('spacing_mismatch', 't2')
  _save(_arrays(0)['t2'], path, affine=np.diag([2.0, 2.0, 3.0, 1.0]))
  for m in ('flair', 't2'):
    path, _, _ = new('missing_file', m)
    os.remove(path)
  path, _, _ = new('directory_not_file', 't1ce')
  os.remove(path)
  os.makedirs(path)
  path, _, _ = new('dangling_symlink', 't1')
  os.remove(path)
  os.symlink(path + '.gone', path)
  for m, value in (('flair', 0.0), ('t1', 7.0)):
    path, _, _ = new('constant_image', m)
    _save(np.full(SHAPE, value, np.float32), path)
  path, _, _ = new('not_gzip', 'flair', None)
  raw = _raw(path)
  with open(path, 'wb') as f:
    f.write(raw)
  for _ in range(3):
    path, _, _ = new('random_bytes', rng.choice(MODALITIES))
    with open(path, 'wb') as f:
      f.write(rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())
  return out


def clear_case(root, case):
  shutil.rmtree(os.path.join(root, case))
