import os

import numpy as np
import pytest

from cgc_jax import store as store_lib


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
