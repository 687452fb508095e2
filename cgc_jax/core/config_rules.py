"""The values each config field may take: named choices and numeric ranges, checked before any
stage runs, so a mistyped field stops the command with one message (exit 2) instead of a traceback
minutes into training, and nothing is written.

    check(config)  # raises errors.ConfigError listing every bad field with what it accepts
"""
from cgc_jax import errors

# The choices repeat what the stages accept (evaluate.SELECT_RULES, unet.build's dtypes, ...)
# rather than import them: pipeline imports this module, and must not import JAX
# (tests/test_config_rules.py checks the two agree).

# field -> the accepted values (a field the config lacks is not checked: older workdirs' configs)
CHOICES = {
    'data.layout': ('brats', 'folder', 'cq500', 'phantoms'),
    'data.kind': ('mri', 'ct'),
    'data.bias_field': ('none', 'n4'),
    'data.store_dtype': ('float16', 'float32'),
    'data.phantoms.kind': ('mri', 'ct'),
    'gmm.rule': ('max_mean', 'hu_range', 'signature'),
    'pseudo_labels.source': ('gmm', 'threshold', 'nifti', 'ground_truth'),
    'model.norm': ('instance', 'group'),
    'model.conv_impl': ('auto', 'sum2d', 'native', 'onednn'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'cgc.fine_anchors': ('patch', 'cell'),
    'train.loss_region': ('brain', 'all'),
    'eval.select': ('latest', 'flip_agreement', 'confident_ce', 'p_agreement'),
    'eval.fold_networks': ('all', 'unseen', 'agreement'),
    'eval.border_side': ('clamp', 'reflect'),
    'train.ensemble_guide': ('none', 'cases', 'voxels'),
    'eval.output_format': ('nifti', 'dicom_seg'),
    'train.crops_on': ('auto', 'host', 'device'),
}

# field -> (low, high, low included, high included)
RANGES = {
    'gmm.threshold': (0.0, 1.0, False, False),
    'gmm.vote': (0.0, 1.0, False, True),
    'gmm.keep_fraction': (0.0, 1.0, True, True),
    'cgc.cell_threshold': (0.0, 1.0, False, True),
    'cgc.tau': (0.0, float('inf'), False, False),
    'train.steps': (1, float('inf'), True, False),
    'train.batch_size': (1, float('inf'), True, False),
    'train.fg_fraction': (0.0, 1.0, True, True),
    'train.gce_q': (0.0, 1.0, True, True),
    'train.bootstrap': (0.0, 1.0, True, False),
    'train.confidence_gamma': (0.0, float('inf'), True, False),
    'train.symmetry_margin': (0.0, float('inf'), True, False),
    'train.quality_weight': (0.0, 1.0, True, True),
    'eval.edge_mm': (0.0, float('inf'), True, False),
    'gmm.edge_mm': (0.0, float('inf'), True, False),
    'train.symmetry_sigma': (0.0, float('inf'), True, False),
    'train.elr_decay': (0.0, 1.0, True, False),
    'train.correct_start': (0.0, 1.0, True, True),
    'train.correct_threshold': (0.0, 1.0, True, False),
    'train.lr': (0.0, float('inf'), False, False),
    'train.spatial_p': (0.0, 1.0, True, True),
    'train.rotate_deg': (0.0, 180.0, True, True),
    'eval.overlap': (0.0, 1.0, True, False),
    'eval.keep_fraction': (0.0, 1.0, True, True),
    'eval.min_component_probability': (0.0, 1.0, True, True),
    'eval.average_checkpoints': (0, float('inf'), True, False),
    'eval.border_mm': (0.0, float('inf'), True, False),
    'train.folds': (1, float('inf'), True, False),
    'train.ensemble': (1, float('inf'), True, False),
    'data.n4_shrink': (1, float('inf'), True, False),
    'train.crops_device_memory': (0.0, 1.0, False, True),
}


_MISSING = object()


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


def _interval(lo, hi, lo_in, hi_in) -> str:
  return f'{"[" if lo_in else "("}{lo}, {hi}{"]" if hi_in else ")"}'


def problems(config) -> list:
  """Every bad field as 'name: value (expected ...)', in CHOICES then RANGES order."""
  out = []
  for name, allowed in CHOICES.items():
    value = _get(config, name)
    if value is not _MISSING and value not in allowed:
      out.append(f'{name}: {value!r} (expected one of {" | ".join(allowed)})')
  for name, (lo, hi, lo_in, hi_in) in RANGES.items():
    value = _get(config, name)
    if value is _MISSING:
      continue
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)
    if not ok:
      out.append(f'{name}: {value!r} (expected a number in {_interval(lo, hi, lo_in, hi_in)})')
  n, keep = _get(config, 'eval.average_checkpoints'), _get(config, 'train.keep_checkpoints')
  if _MISSING not in (n, keep) and not out and n > keep:
    out.append(f'eval.average_checkpoints: {n} (expected at most train.keep_checkpoints = {keep})')
  folds, ensemble = _get(config, 'train.folds'), _get(config, 'train.ensemble')
  for name, k in (('train.folds', folds), ('train.ensemble', ensemble)):
    if k is not _MISSING and isinstance(k, float) and not k.is_integer():
      out.append(f'{name}: {k!r} (expected a whole number of networks)')
    elif k is not _MISSING and isinstance(k, (int, float)) and k > 1:
      every, select = _get(config, 'eval.every_steps'), _get(config, 'eval.select')
      if every not in (_MISSING, 0) or select not in (_MISSING, 'latest'):
        out.append(f'{name}: {k} (several networks: each keeps its latest checkpoint, so expected '
                   f'eval.every_steps = 0 and eval.select = latest, got {every} and {select})')
  if (isinstance(folds, (int, float)) and folds > 1 and isinstance(ensemble, (int, float)) and
      ensemble > 1):
    out.append(f'train.ensemble: {ensemble} (expected 1 with train.folds = {folds}: cross-fitting '
               f'and an ensemble are two ways to train several networks; choose one)')
  guide = _get(config, 'train.ensemble_guide')
  if guide not in (_MISSING, 'none') and not (isinstance(ensemble, (int, float)) and ensemble > 1):
    out.append(f'train.ensemble_guide: {guide!r} (network 0 of an ensemble guides the others: '
               f'expected train.ensemble >= 2, got {ensemble})')
  border, source = _get(config, 'eval.border_mm'), _get(config, 'pseudo_labels.source')
  if isinstance(border, (int, float)) and border > 0 and source not in (_MISSING, 'gmm'):
    out.append(f'eval.border_mm: {border} (the border refinement refits the mixture on new scans: '
               f'expected pseudo_labels.source = gmm, got {source!r})')
  corr = _get(config, 'train.correct_threshold')
  if isinstance(corr, (int, float)) and 0 < corr <= 0.5:
    out.append(f'train.correct_threshold: {corr} (expected 0, off, or a number in (0.5, 1): the '
               f'network must be surer than a coin toss)')
  sym, mod = _get(config, 'train.symmetry_margin'), _get(config, 'train.symmetry_modality')
  mods = _get(config, 'data.modalities')
  if isinstance(sym, (int, float)) and sym > 0 and mods not in (_MISSING, None) and \
      mod not in tuple(mods):
    out.append(f'train.symmetry_modality: {mod!r} (expected one of data.modalities '
               f'{list(mods)} while train.symmetry_margin > 0)')
  if _get(config, 'eval.border_symmetry') is True and not (isinstance(sym, (int, float)) and
                                                            sym > 0):
    out.append(f'eval.border_symmetry: True (P\'s symmetric voxels are train.symmetry_margin\'s: '
               f'expected train.symmetry_margin > 0, got {sym})')
  spatial = _get(config, 'train.spatial_p')
  if _get(config, 'train.crops_on') == 'device' and isinstance(spatial, (int, float)) and \
      spatial > 0:
    out.append(f"train.crops_on: 'device' (the devices cut unrotated crops: expected "
               f"train.spatial_p = 0, got {spatial}, or train.crops_on = 'host')")
  if _get(config, 'data.bias_field') == 'n4' and _get(config, 'data.kind') == 'ct':
    out.append("data.bias_field: 'n4' (N4 removes an MRI coil's field: expected 'none' with "
               "data.kind = ct)")
  if _get(config, 'gmm.rule') == 'signature':
    if _get(config, 'data.kind') == 'ct':
      out.append("gmm.rule: 'signature' (it reads z-scores of MRI channels: expected 'hu_range' or "
                 "'max_mean' with data.kind = ct)")
    sig = _get(config, 'gmm.signature')
    if sig is not _MISSING:
      for item in (sig if isinstance(sig, (list, tuple)) else [sig]):
        try:
          parse_signature([item])
        except ValueError:
          out.append(f'gmm.signature: {item!r} (expected items "channel:weight", e.g. "t1:-1")')
          break
  zoom = _get(config, 'train.zoom')
  if zoom is not _MISSING and not (
      isinstance(zoom, (list, tuple)) and len(zoom) == 2 and
      all(isinstance(z, (int, float)) and not isinstance(z, bool) and z > 0 for z in zoom) and
      zoom[0] <= zoom[1]):
    out.append(f'train.zoom: {zoom!r} (expected (low, high) with 0 < low <= high)')
  return out


def parse_signature(spec) -> dict:
  """('flair:1', 't1:-1') -> {'flair': 1.0, 't1': -1.0}: gmm.signature's weight per channel
  (labels.gmm reads it through here); ValueError naming the first item that is not
  'channel:weight'."""
  out = {}
  for item in (spec if isinstance(spec, (list, tuple)) else [spec]):
    name, sep, w = str(item).partition(':')
    try:
      weight = float(w)
    except ValueError:
      weight = None
    if not sep or not name.strip() or weight is None:
      raise ValueError(f'gmm.signature item {item!r}: expected "channel:weight" (e.g. "t1:-1")')
    out[name.strip()] = weight
  return out


def check(config) -> None:
  """Raises errors.ConfigError naming every field of `config` outside its choices or range."""
  bad = problems(config)
  if bad:
    raise errors.ConfigError('config: ' + ('; '.join(bad) if len(bad) == 1 else
                                          f'{len(bad)} bad fields:\n  ' + '\n  '.join(bad)))
