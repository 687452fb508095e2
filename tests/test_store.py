import os

import numpy as np
import pytest

from cgc_jax.core import store as store_lib


def test_write_read_checksum_and_partial(tmp_path):
  s = store_lib.Store(str(tmp_path), 'fp1')
  a = np.arange(60, dtype=np.float16).reshape(3, 4, 5)
  s.write('c1', {'image': a}, {'x': 1})
  assert s.is_complete('c1')
  np.testing.assert_array_equal(s.read('c1', 'image'), a)
  # another fingerprint does not count as complete
  assert not store_lib.Store(str(tmp_path), 'fp2').is_complete('c1')
  # a partial shard (killed writer) is never complete and is cleaned up
  os.makedirs(tmp_path / 'cases' / '.tmp-c2-123')
  os.makedirs(tmp_path / 'cases' / 'c3')  # arrays but no meta.json
  assert not s.is_complete('c3')
  s.clean_partial()
  assert not os.path.exists(tmp_path / 'cases' / '.tmp-c2-123')
  # a damaged array is detected on read
  path = tmp_path / 'cases' / 'c1' / 'image.npy'
  raw = bytearray(path.read_bytes())
  raw[-1] ^= 0xFF
  path.write_bytes(bytes(raw))
  with pytest.raises(store_lib.CorruptShardError, match='checksum mismatch'):
    store_lib.Store(str(tmp_path), 'fp1').read('c1', 'image')


def test_manifest_lists_complete_cases(tmp_path):
  s = store_lib.Store(str(tmp_path), 'fp')
  s.write('b', {'x': np.zeros(3)}, {})
  s.write('a', {'x': np.ones(3)}, {})
  s.write_manifest(['b', 'a'])
  assert s.complete_cases() == ['a', 'b']
  assert store_lib.Store(str(tmp_path), 'other').complete_cases() == []


def test_inputs_with_a_new_mtime_but_the_same_bytes_are_unchanged(tmp_path):
  f = tmp_path / 'scan.nii.gz'
  f.write_bytes(b'abcdef')
  ident = store_lib.file_identity([str(f)])
  digests = {p: store_lib.content_digest(p) for p in ident}
  s = store_lib.Store(str(tmp_path / 'store'), 'fp')
  s.write('c', {'a': np.zeros(2, np.uint8)}, {'inputs': ident, 'input_digests': digests})
  assert s.is_complete('c', ident)
  os.utime(f, ns=(10**18, 10**18))  # copied or touched: new mtime, same bytes
  now = store_lib.file_identity([str(f)])
  assert now != ident and store_lib.same_files(ident, now, digests)
  assert s.is_complete('c', now)
  f.write_bytes(b'abcdeX')  # same size, other bytes
  now = store_lib.file_identity([str(f)])
  assert not store_lib.same_files(ident, now, digests) and not s.is_complete('c', now)
  f.write_bytes(b'abcdefg')  # other size: no hashing needed to tell
  assert not s.is_complete('c', store_lib.file_identity([str(f)]))
  # a shard without recorded digests (made before they were recorded) still needs equal stats
  s.write('old', {'a': np.zeros(2, np.uint8)}, {'inputs': ident})
  f.write_bytes(b'abcdef')
  os.utime(f, ns=(2 * 10**18, 2 * 10**18))
  assert not s.is_complete('old', store_lib.file_identity([str(f)]))


def test_identity_follows_content_and_upstream_not_file_stats(tmp_path):
  s = store_lib.Store(str(tmp_path), 'fp')
  a = np.arange(6, dtype=np.uint8)
  s.write('c', {'a': a}, {'inputs': {'/data/scan.nii.gz': [6, 1]}})
  first = s.identity('c')
  s.write('c', {'a': a}, {'inputs': {'/data/scan.nii.gz': [6, 2]}})  # re-copied: new mtime
  assert s.identity('c') == first
  s.write('c', {'a': a + 1}, {'inputs': {'/data/scan.nii.gz': [6, 2]}})  # other arrays
  assert s.identity('c') != first
  s.write('c', {'a': a}, {'inputs': {'prepared': 'aaaa'}})  # made from an upstream shard
  up = s.identity('c')
  s.write('c', {'a': a}, {'inputs': {'prepared': 'bbbb'}})  # ... which changed
  assert s.identity('c') != up
  other = store_lib.Store(str(tmp_path / 'other'), 'fp2')  # another config, same arrays
  other.write('c', {'a': a}, {'inputs': {'prepared': 'bbbb'}})
  assert other.identity('c') != s.identity('c')


def test_legacy_identity_is_the_earlier_formula_and_accepted_downstream(tmp_path):
  """Workdirs of earlier versions recorded identities with the raw inputs (file stats) inside:
  legacy_identity() reproduces that value, P shards and checkpoints recording it stay current."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from cgc_jax.stages import pseudo_labels, train  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  prep = store_lib.Store(str(tmp_path / 'prep'), 'fp')
  inputs = {'/data/scan.nii.gz': [6, 1]}
  prep.write('c', {'a': np.arange(3, dtype=np.uint8)}, {'inputs': inputs})
  crc = prep.meta('c')['arrays']['a']['crc32']
  old = hashlib.sha256(json.dumps(['fp', inputs, [['a', crc]]], sort_keys=True).encode())
  assert prep.legacy_identity('c') == old.hexdigest()[:16] != prep.identity('c')
  labels = store_lib.Store(str(tmp_path / 'pl'), 'fq')
  cfg = tiny_config()
  labels.write('c', {'p': np.zeros(3, np.uint8)},
               {'inputs': {'prepared': prep.legacy_identity('c')}})
  assert pseudo_labels.expected_inputs(cfg, prep, labels, 'c') == {
      'prepared': prep.legacy_identity('c')}  # an earlier version's P of this shard: current
  labels.write('c', {'p': np.zeros(3, np.uint8)}, {'inputs': {'prepared': 'other'}})
  assert pseudo_labels.expected_inputs(cfg, prep, labels, 'c') == {'prepared': prep.identity('c')}
  now = {'c': labels.identity('c')}
  assert train.accept_legacy({'c': labels.legacy_identity('c')}, now, labels) == {
      'c': labels.legacy_identity('c')}
  assert train.accept_legacy({'c': 'changed'}, now, labels) == now
  assert train.accept_legacy(None, now, labels) == now


def test_case_cache_returns_a_value_only_for_its_key(tmp_path):
  path = str(tmp_path / 'cache.json')
  c = store_lib.CaseCache(path)
  assert c.get('a', 'k1') is None
  c.put('a', ['k1', 'r1'], {'dice': 0.5})
  c.save(write=False)  # another process: nothing written
  assert not os.path.exists(path)
  c.save()
  again = store_lib.CaseCache(path)
  assert again.get('a', ['k1', 'r1']) == {'dice': 0.5}
  assert again.get('a', ['k1', 'r2']) is None and again.get('b', ['k1', 'r1']) is None
  mtime = os.stat(path).st_mtime_ns
  again.save()  # nothing put: the file is left alone
  assert os.stat(path).st_mtime_ns == mtime
