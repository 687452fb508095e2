"""On-disk sharded arrays: one shard (folder) per case, `.npy` arrays, crc32 checksums, manifest
last.

Layout of a store folder (e.g. WORKDIR/prepared):

    cases/<case_id>/<name>.npy    arrays, read with mmap (a training crop reads ~only the crop)
    cases/<case_id>/meta.json     written LAST: array names, shapes, dtypes, crc32, plus stage
    metadata manifest.json                 list of complete cases + the stage fingerprint (written
    at stage end)

A shard is written into `cases/.tmp-<case_id>-<pid>/` and renamed into place once its meta.json is
written, so a killed writer leaves only a `.tmp-*` folder, which is never read and is removed on the
next run. A shard counts as complete only when `cases/<case_id>/meta.json` exists and its
fingerprint matches; checksums are verified when a shard is opened (once per process).
"""
import hashlib
import json
import os
import shutil
import zlib
from typing import Optional

import numpy as np

from cgc_jax import errors


def crc32_file(path: str, chunk: int = 1 << 22) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while True:
      b = f.read(chunk)
      if not b:
        return crc
      crc = zlib.crc32(b, crc)


CorruptShardError = errors.CorruptShardError  # defined in errors.py, with every user-facing error


def atomic_write_text(path: str, text: str):
  """Writes `text` to `path` through a temporary file and a rename; a file that already holds
  exactly this text is left alone (a stage with nothing to do leaves its outputs' mtimes
  unchanged)."""
  try:
    with open(path) as f:
      if f.read() == text:
        return
  except (OSError, UnicodeDecodeError):
    pass
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_bytes(path: str, data: bytes):
  """Writes `data` to `path` through a temporary file beside it and a rename."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_json(path: str, obj):
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


_DIGESTS = {}  # (real path, size, mtime_ns) -> content digest: each file version hashed once


def content_digest(path: str) -> Optional[str]:
  """sha256 (16 hex digits) of a file's bytes; None for a missing file."""
  real = os.path.realpath(path)
  try:
    st = os.stat(real)
  except OSError:
    return None
  key = (real, st.st_size, st.st_mtime_ns)
  if key not in _DIGESTS:
    h = hashlib.sha256()
    with open(real, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
    _DIGESTS[key] = h.hexdigest()[:16]
  return _DIGESTS[key]


def same_files(recorded: dict, current: dict, digests: Optional[dict]) -> bool:
  """Whether input files are unchanged: the same (size, mtime_ns) as `recorded` ({path: [size,
  mtime_ns]}), or, where only the mtime differs, the same content digest as recorded in
  `digests` (a copy or a touch changes a file's mtime, not its data): stat first, then hash, as
  git does."""
  if recorded == current:
    return True
  if not digests or not isinstance(recorded, dict) or set(recorded) != set(current):
    return False
  for path, cur in current.items():
    old = recorded[path]
    if old == cur:
      continue
    if old is None or cur is None or old[0] != cur[0] or not digests.get(path):
      return False
    if content_digest(path) != digests[path]:
      return False
  return True


def file_identity(paths) -> dict:
  """{real path: [size, mtime_ns]} of input files (None for a missing one): cheap, and changes when
  a file is replaced or rewritten."""
  out = {}
  for p in paths:
    if not p:
      continue
    real = os.path.realpath(p)
    try:
      st = os.stat(real)
      out[real] = [int(st.st_size), int(st.st_mtime_ns)]
    except OSError:
      out[real] = None
  return out


def _shard_digest(meta: dict, inputs) -> str:
  """16 hex digits of sha256 over a shard's fingerprint, the given inputs and its arrays' crc32s."""
  blob = json.dumps([meta.get('fingerprint'), inputs,
                     sorted((k, v['crc32']) for k, v in meta['arrays'].items())], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Store:
  """A folder of per-case shards. `fingerprint` identifies the config that produced them."""

  def __init__(self, root: str, fingerprint: str = ''):
    self.root = root
    self.fingerprint = fingerprint
    self._verified = set()

  def case_dir(self, case_id: str) -> str:
    return os.path.join(self.root, 'cases', case_id)

  def is_complete(self, case_id: str, inputs: Optional[dict] = None) -> bool:
    """The shard exists, was made with this fingerprint and, when `inputs` is given, from exactly
    these inputs (a replaced scan, or another folder's case of the same id, is not complete)."""
    meta = self.meta(case_id, missing_ok=True)
    return (meta is not None and meta.get('fingerprint') == self.fingerprint and
            (inputs is None or meta.get('inputs') == inputs or
             same_files(meta.get('inputs'), inputs, meta.get('input_digests'))))

  def identity(self, case_id: str) -> str:
    """A digest of a complete shard's content (its arrays' checksums, its fingerprint and the
    identities of the upstream shards it was made from): what a downstream stage records to notice
    that this shard changed. Raw input files enter only through the arrays made from them, so a
    scan copied again (new mtime) that prepares to the same arrays keeps its identity."""
    meta = self.meta(case_id)
    return _shard_digest(meta, {k: v for k, v in (meta.get('inputs') or {}).items()
                                if isinstance(v, str)})

  def legacy_identity(self, case_id: str) -> str:
    """identity() by the formula of versions before 2026-12 (the raw `inputs` entry as recorded,
    file stats included). Shards and checkpoints of such workdirs recorded it; downstream stages
    accept it in place of identity() for the same unchanged shard, so they stay current."""
    meta = self.meta(case_id)
    return _shard_digest(meta, meta.get('inputs'))

  def meta(self, case_id: str, missing_ok: bool = False) -> Optional[dict]:
    path = os.path.join(self.case_dir(case_id), 'meta.json')
    if not os.path.exists(path):
      if missing_ok:
        return None
      raise FileNotFoundError(f'{path}: shard missing or incomplete (run the stage that writes it)')
    with open(path) as f:
      return json.load(f)

  def clean_partial(self):
    """Removes `.tmp-*` shards left by killed writers."""
    d = os.path.join(self.root, 'cases')
    if os.path.isdir(d):
      for name in os.listdir(d):
        if name.startswith('.tmp-'):
          shutil.rmtree(os.path.join(d, name), ignore_errors=True)

  def write(self, case_id: str, arrays: dict, meta: dict):
    """Writes one shard atomically: arrays, then meta.json, then a rename into place."""
    cases = os.path.join(self.root, 'cases')
    os.makedirs(cases, exist_ok=True)
    tmp = os.path.join(cases, f'.tmp-{case_id}-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    entries = {}
    for name, arr in arrays.items():
      arr = np.ascontiguousarray(arr)
      path = os.path.join(tmp, f'{name}.npy')
      np.save(path, arr)
      entries[name] = {'shape': list(arr.shape), 'dtype': str(arr.dtype), 'crc32': crc32_file(path)}
    full = dict(meta, case_id=case_id, arrays=entries, fingerprint=self.fingerprint)
    atomic_write_json(os.path.join(tmp, 'meta.json'), full)
    final = self.case_dir(case_id)
    if os.path.exists(final):  # stale shard (other fingerprint): replace it
      old = f'{tmp}.old'
      os.replace(final, old)
      os.replace(tmp, final)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, final)

  def read(self, case_id: str, name: str, verify: bool = True, mmap: bool = True) -> np.ndarray:
    """Returns array `name` of a complete shard (memory-mapped); checksum checked on first read."""
    meta = self.meta(case_id)
    if name not in meta['arrays']:
      raise KeyError(f'{self.case_dir(case_id)}: no array {name!r} (has {sorted(meta["arrays"])})')
    entry = meta['arrays'][name]
    path = os.path.join(self.case_dir(case_id), f'{name}.npy')
    key = (case_id, name)
    if verify and key not in self._verified:
      crc = crc32_file(path)
      if crc != entry['crc32']:
        raise CorruptShardError(f'{path}: checksum mismatch (crc32 {crc} != recorded '
                                f'{entry["crc32"]}): the file was modified or damaged; delete the '
                                'case folder and re-run the stage')
      self._verified.add(key)
    arr = np.load(path, mmap_mode='r' if mmap else None)
    if list(arr.shape) != entry['shape'] or str(arr.dtype) != entry['dtype']:
      raise CorruptShardError(f'{path}: shape/dtype {arr.shape}/{arr.dtype} != recorded '
                              f'{entry["shape"]}/{entry["dtype"]}')
    return arr

  def write_manifest(self, case_ids: list, extra: Optional[dict] = None):
    os.makedirs(self.root, exist_ok=True)
    atomic_write_json(os.path.join(self.root, 'manifest.json'),
                      dict(extra or {}, fingerprint=self.fingerprint, cases=sorted(case_ids)))

  def manifest(self) -> Optional[dict]:
    path = os.path.join(self.root, 'manifest.json')
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def complete_cases(self) -> list:
    m = self.manifest()
    if m is None or m.get('fingerprint') != self.fingerprint:
      return []
    return [c for c in m['cases'] if self.is_complete(c)]


class CaseCache:
  """A JSON file of per-case values, each kept with the key (e.g. the identities of the shards it
  was computed from) it stands for: get() returns a value only while its key is unchanged."""

  def __init__(self, path: str):
    self.path = path
    self._data, self._changed = {}, False
    if os.path.exists(path):
      with open(path) as f:
        self._data = json.load(f)

  def get(self, case_id: str, key):
    entry = self._data.get(case_id) or {}
    return entry.get('value') if entry.get('key') == key else None

  def put(self, case_id: str, key, value):
    self._data[case_id] = {'key': key, 'value': value}
    self._changed = True

  def save(self, write: bool = True):
    """Writes the file when anything was put (write: this process writes, e.g. JAX process 0)."""
    if self._changed and write:
      atomic_write_json(self.path, self._data)

