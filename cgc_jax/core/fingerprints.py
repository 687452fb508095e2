"""Stage fingerprints: a hash of the config fields a stage's output depends on.

A stage's output is stale when its recorded fingerprint differs from the current config's;
`--mode=all` re-runs stale stages. Fields that do not change the output (worker counts, logging) are
left out.
"""
import hashlib
import json
import os

from cgc_jax.core import compat

_STAGE_FIELDS = {
    'prepare': ('data',),
    'pseudo_labels': ('data', 'gmm', 'pseudo_labels'),
    'train': ('data', 'gmm', 'pseudo_labels', 'model', 'cgc', 'train'),
    'evaluate': ('data', 'gmm', 'pseudo_labels', 'model', 'cgc', 'train', 'eval'),
}
_IGNORED = {'num_workers', 'verify_checksums', 'log_every', 'prefetch', 'export_nifti',
            'every_steps', 'confident', 'input_root', 'pictures', 'output_dir',
            'save_probabilities', 'progress_every_s', 'restart_when_stale',
            'conv_impl',  # same arithmetic, only speed differs
            'crops_on', 'crops_device_memory',  # the same crops, cut on the host or the devices
            'package',  # a path: predict reads the networks from it
            # more scans in the pool: each case's shard records its own inputs, each checkpoint
            # its cases, so adding a folder prepares and pseudo-labels only its cases
            'extra_roots',
            'output_format',  # a second file beside the NIfTI mask
            # checks that warn or stop, never change an output
            'strict_brain_mask', 'raw_scan_coverage', 'raw_scan_faces', 'ct_bone_hu',
            'ct_bone_fraction'}


def _as_lists(v):
  return [_as_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def _clean(d):
  if isinstance(d, dict):
    return {k: _clean(v) for k, v in sorted(d.items()) if k not in _IGNORED}
  if isinstance(d, (list, tuple)):
    return [_clean(v) for v in d]
  return d


_PATHS = (('data', 'root'), ('pseudo_labels', 'nifti_dir'))


def fields(config, stage: str) -> dict:
  full = config.to_dict()
  for section, key in _PATHS:  # the same folder, however it is spelled
    if full.get(section, {}).get(key):
      full[section][key] = os.path.realpath(full[section][key])
  # tuples as lists: a config read back from JSON
  for (section, key), value in compat.OMIT_AT.items():
    node = full
    for part in section.split('.'):
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and _as_lists(node.get(key, value)) == _as_lists(value):
      node.pop(key, None)
  return {k: _clean(full[k]) for k in _STAGE_FIELDS[stage]}


def of(config, stage: str) -> str:
  blob = json.dumps(fields(config, stage), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff(a: dict, b: dict, prefix: str = '') -> list:
  """Dotted names of the fields that differ between two nested dicts."""
  out = []
  for k in sorted(set(a) | set(b)):
    name = f'{prefix}{k}'
    va, vb = a.get(k, '<missing>'), b.get(k, '<missing>')
    if isinstance(va, dict) and isinstance(vb, dict):
      out += diff(va, vb, name + '.')
    elif json.dumps(va, default=str) != json.dumps(vb, default=str):
      out.append(f'{name}: {va!r} -> {vb!r}')
  return out
