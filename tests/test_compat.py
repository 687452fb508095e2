"""The compatibility paths kept in core.compat, by hand (their use on real stores: test_store)."""
from cgc_jax.core import compat
from cgc_jax.core import fingerprints
from cgc_jax.core import store as store_lib

from conftest import tiny_config


def test_p_inputs_accept_the_earlier_identity_of_the_same_prepared_shard():
  now = {'prepared': 'new-formula'}
  assert compat.p_inputs(now, {'prepared': 'old-formula'}, 'old-formula') == {
      'prepared': 'old-formula'}
  assert compat.p_inputs(now, {'prepared': 'something else'}, 'old-formula') == now
  assert compat.p_inputs(now, None, 'old-formula') == now


def test_checkpoint_inputs_keep_only_the_matching_earlier_identities():
  legacy = {'a': 'old-a', 'b': 'old-b'}.get
  got = compat.checkpoint_inputs({'a': 'old-a', 'b': 'changed'}, {'a': 'new-a', 'b': 'new-b'},
                                 legacy)
  assert got == {'a': 'old-a', 'b': 'new-b'}


def test_trained_cases_from_either_record_form():
  assert compat.trained_cases({'inputs': {'b': 1, 'a': 2}}) == ['a', 'b']
  assert compat.trained_cases({'cases': ['d', 'c']}) == ['c', 'd']
  assert compat.trained_cases({}) == []


def test_every_field_left_out_of_the_fingerprints_exists_in_the_config():
  c = tiny_config()
  for section, key in compat.OMIT_AT:
    assert key in c[section], (section, key)
  assert 'ensemble' not in fingerprints.fields(c, 'train')['train']


def test_prepared_inputs_accept_a_shard_that_recorded_its_label_file(tmp_path):
  image, label = tmp_path / 'flair.nii.gz', tmp_path / 'seg.nii.gz'
  image.write_bytes(b'image')
  label.write_bytes(b'label')
  now = {str(image): [5, 1]}
  old = {'inputs': {str(image): [5, 1], str(label): [5, 2]}, 'files': {'label': str(label)}}
  assert compat.prepared_inputs(now, old) == old['inputs']  # current: nothing re-prepared
  assert compat.prepared_inputs({str(image): [6, 3]}, old) == {str(image): [6, 3]}  # image changed
  assert compat.prepared_inputs(now, dict(old, files={'label': None})) == now
  assert compat.prepared_inputs(now, None) == now
  # an old shard's image copied again (new mtime, same bytes) stays current too
  digests = {str(image): store_lib.content_digest(str(image))}
  st = image.stat()
  copied = {str(image): [st.st_size, st.st_mtime_ns]}
  old = {'inputs': {str(image): [st.st_size, 1], str(label): [5, 2]},
         'files': {'label': str(label)}, 'input_digests': digests}
  assert compat.prepared_inputs(copied, old) == old['inputs']


def test_masks_record_from_an_earlier_summary():
  old = {'fingerprint': 'f', 'checkpoint_step': 40, 'inputs': {'a': ['p1', 'l1']}, 'cases': []}
  assert compat.masks_record(old) == {'fingerprint': 'f', 'checkpoint_step': 40,
                                      'inputs': {'a': ['p1', 'l1']}}
  new = dict(old, inputs={'a': ['p1', 'l1', 'r1']})  # the reference identity is not part of it
  assert compat.masks_record(new) == compat.masks_record(old)
  assert compat.masks_record(None) is None
  assert compat.masks_record(dict(old, checkpoint_step=None)) is None  # external masks
