"""What keeps workdirs made by earlier versions current: every backward-compatibility path of the
package, listed here, and the ones that are plain bookkeeping implemented here.

- Fields added after runs existed are left out of a stage's fingerprint at the value that
  reproduces the old behaviour (OMIT_AT, here; read by core.fingerprints): every stage's outputs
  of workdirs made before the field existed stay current.
- A config read back from an older workdir's config.json may lack fields; the config rules skip
  them (core.config_rules): `--mode=predict` with an older workdir.
- A prepared shard made when label files were part of a case's inputs (before 2026-12-03) stays
  current while its images are unchanged, whatever became of its label (prepared_inputs, here);
  its label arrays are left in it and never read (stages/references.py reads label files).
- An evaluation made before its masks kept a record of their own (eval/predictions/record.json)
  has its masks re-scored, not predicted again, when its summary names the same networks and
  shards (masks_record, here).
- A P shard that recorded its prepared shard by the identity formula before 2026-12 (file stats
  included) stays current (p_inputs, here; store.Store.legacy_identity).
- A checkpoint that recorded its P shards by that formula is continued, not retrained
  (checkpoint_inputs, here).
- A checkpoint record naming its training cases `cases` rather than `inputs` (trained_cases, here):
  cross-fitting's fold networks of older runs.
- A checkpoint whose train state still holds the unused `rng` is read through that layout
  (model.train_state.LegacyTrainState, model.checkpoint).

Each is exercised by a test (test_store, test_paths, test_config_rules, test_train).
"""
import os
from typing import Callable, Optional

# Fields added after runs existed, left out of the fingerprints while at these values (which
# reproduce the earlier behaviour), so that those runs stay current: (section, key) -> value; a
# section may be dotted ('data.phantoms').
OMIT_AT = {('train', 'elr_lambda'): 0.0, ('train', 'elr_decay'): 0.97,
           ('cgc', 'fine_anchors'): 'patch', ('eval', 'keep_fraction'): 0.0,
           ('eval', 'average_checkpoints'): 0, ('train', 'spatial_p'): 0.0,
           ('train', 'rotate_deg'): 15.0, ('train', 'zoom'): (0.85, 1.15), ('train', 'folds'): 1,
           ('eval', 'fold_networks'): 'all', ('eval', 'border_mm'): 0.0,
           ('train', 'correct_threshold'): 0.0, ('train', 'correct_start'): 0.5,
           ('train', 'symmetry_margin'): 0.0, ('train', 'symmetry_modality'): 'flair',
           ('train', 'symmetry_sigma'): 1.0, ('train', 'ensemble'): 1,
           ('eval', 'border_symmetry'): False, ('data.phantoms', 'lesions'): 1,
           ('data.phantoms', 'lesion_radius'): (4.0, 7.0), ('train', 'quality_weight'): 0.0,
           ('data.phantoms', 'ct_rim_hu'): 0.0, ('eval', 'edge_mm'): 0.0,
           ('gmm', 'edge_mm'): 0.0, ('gmm', 'standardise'): False,
           ('train', 'ensemble_guide'): 'none', ('data', 'antialias'): False,
           ('data', 'bias_field'): 'none', ('data', 'n4_shrink'): 4,
           ('data', 'n4_iterations'): (100,), ('gmm', 'signature'): ('flair:1', 't2:1', 't1:-1'),
           ('eval', 'border_side'): 'clamp'}


def prepared_inputs(current: dict, meta: Optional[dict]) -> dict:
  """What a case's prepared shard should have recorded: `current` (its image files' identities),
  or the shard's recorded inputs when they are `current` plus the label file the shard was made
  with (`meta['files']['label']`), so that shard stays current."""
  if not meta:
    return current
  recorded, label = meta.get('inputs'), (meta.get('files') or {}).get('label')
  if not label or not isinstance(recorded, dict):
    return current
  from cgc_jax.core import store  # pylint: disable=g-import-not-at-top
  real = os.path.realpath(label)
  images = {k: v for k, v in recorded.items() if k != real}
  if real in recorded and store.same_files(images, current, meta.get('input_digests')):
    return recorded
  return current


def masks_record(summary: Optional[dict]) -> Optional[dict]:
  """The record of the masks an earlier evaluation wrote (fingerprint, checkpoint step, prepared
  and P shard identities per case), from its summary.json; None without one."""
  if not summary or not summary.get('inputs') or summary.get('checkpoint_step') is None:
    return None
  return {'fingerprint': summary.get('fingerprint'),
          'checkpoint_step': summary['checkpoint_step'],
          'inputs': {c: list(v[:2]) for c, v in summary['inputs'].items()}}


def p_inputs(current: dict, recorded: Optional[dict], legacy_prepared: str) -> dict:
  """What a case's P shard should have recorded: `current`, or `recorded` when it names the same
  prepared shard by the earlier identity formula (`legacy_prepared`), so that shard stays current
  rather than being redone."""
  if recorded and recorded == dict(current, prepared=legacy_prepared):
    return recorded
  return current


def checkpoint_inputs(recorded: Optional[dict], inputs: dict,
                      legacy_identity: Callable[[str], str]) -> dict:
  """`inputs` (case -> P shard identity) with each case whose checkpoint recorded the same shard by
  the earlier identity formula (legacy_identity(case)) given that recorded value."""
  return {c: recorded[c] if recorded and recorded.get(c) not in (None, v) and
          recorded[c] == legacy_identity(c) else v for c, v in inputs.items()}


def trained_cases(record: dict) -> list:
  """The cases a checkpoint was trained on, from its record (`inputs`, or `cases` in older ones)."""
  return sorted(record.get('inputs') or record.get('cases') or [])
