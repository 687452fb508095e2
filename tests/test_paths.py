"""The workdir layout and the stages' config fingerprints."""
import os

from cgc_jax.core import fingerprints
from cgc_jax.core import paths

from conftest import tiny_config

def test_fields_added_later_leave_fingerprints_alone_at_their_old_behaviour():
  c = tiny_config()
  before = fingerprints.of(c, 'train')
  assert 'elr_lambda' not in fingerprints.fields(c, 'train')['train']
  c.train.elr_lambda = 3.0
  assert fingerprints.of(c, 'train') != before
  assert fingerprints.fields(c, 'train')['train']['elr_lambda'] == 3.0
  c.train.elr_lambda = 0.0
  assert fingerprints.of(c, 'train') == before
  assert 'fine_anchors' not in fingerprints.fields(c, 'train')['cgc']
  c.cgc.fine_anchors = 'cell'
  assert fingerprints.of(c, 'train') != before
  c.cgc.fine_anchors = 'patch'
  assert fingerprints.of(c, 'train') == before
  ev = fingerprints.of(c, 'evaluate')
  assert 'keep_fraction' not in fingerprints.fields(c, 'evaluate')['eval']
  c.eval.keep_fraction = 0.5  # an evaluation field: the evaluation goes stale, training does not
  assert fingerprints.of(c, 'evaluate') != ev and fingerprints.of(c, 'train') == before
  c.eval.keep_fraction = 0.0
  assert fingerprints.of(c, 'evaluate') == ev
  for field, other in (('spatial_p', 0.3), ('zoom', (0.9, 1.1)), ('folds', 2),
                       ('ensemble', 2)):  # train fields
    setattr(c.train, field, other)
    assert fingerprints.of(c, 'train') != before, field
  c.train.spatial_p, c.train.zoom, c.train.folds, c.train.ensemble = 0.0, (0.85, 1.15), 1, 1
  assert fingerprints.of(c, 'train') == before
  c.eval.average_checkpoints = 3
  assert fingerprints.of(c, 'evaluate') != ev and fingerprints.of(c, 'train') == before
  c.eval.average_checkpoints = 0
  assert fingerprints.of(c, 'evaluate') == ev
  assert 'border_mm' not in fingerprints.fields(c, 'evaluate')['eval']
  c.eval.border_mm = 4.0
  assert fingerprints.of(c, 'evaluate') != ev and fingerprints.of(c, 'train') == before
  c.eval.border_mm = 0.0
  assert fingerprints.of(c, 'evaluate') == ev
  assert 'border_symmetry' not in fingerprints.fields(c, 'evaluate')['eval']
  c.eval.border_symmetry = True
  assert fingerprints.of(c, 'evaluate') != ev and fingerprints.of(c, 'train') == before
  c.eval.border_symmetry = False
  assert fingerprints.of(c, 'evaluate') == ev
  c.train.seed = 5  # any other field still counts
  assert fingerprints.of(c, 'train') != before


def test_a_config_read_back_from_json_has_the_same_fingerprints():
  """A workdir records its config as JSON (tuples come back as lists): every stage's fingerprint
  of the read-back config equals the original's, fields left out at their old values included."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  for c in (tiny_config(), tiny_config(**{'train.zoom': (0.7, 1.3), 'train.spatial_p': 0.2})):
    back = ml_collections.ConfigDict(json.loads(c.to_json_best_effort()))
    assert isinstance(back.train.zoom, list)
    for stage in ('prepare', 'pseudo_labels', 'train', 'evaluate'):
      assert fingerprints.of(back, stage) == fingerprints.of(c, stage), stage


def test_stores_sit_where_the_layout_says_with_their_stage_fingerprints(tmp_path):
  c = tiny_config()
  wd = str(tmp_path)
  assert paths.prepared_store(c, wd).root == os.path.join(wd, 'prepared')
  assert paths.prepared_store(c, wd).fingerprint == fingerprints.of(c, 'prepare')
  assert paths.pl_store(c, wd).root == os.path.join(wd, 'pseudo_labels')
  assert paths.pl_store(c, wd).fingerprint == fingerprints.of(c, 'pseudo_labels')
  assert paths.predict_store(c, wd).root == os.path.join(wd, 'predict', 'prepared')
  assert paths.checkpoints(wd) == os.path.join(wd, 'checkpoints')
  assert paths.predict_output(c, wd) == os.path.join(wd, 'predict', 'masks')
  c.eval.output_dir = '/elsewhere'
  assert paths.predict_output(c, wd) == '/elsewhere'
