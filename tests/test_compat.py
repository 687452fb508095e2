"""The compatibility paths kept in core.compat, by hand (their use on real stores: test_store)."""
from cgc_jax.core import compat
from cgc_jax.core import fingerprints

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
