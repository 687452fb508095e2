"""The experiment tables: named lists of rows, each row one variant of the configured recipe.

A Row is trained and evaluated (kind 'train': its overrides change the config, training included),
or it scores P itself against the ground truth (kind 'p': its overrides change only the
pseudo-label stage; nothing is trained). Override values are plain config values, or Patch (a
mini-patch as a fraction of the U-Net's bottleneck) or Times (a multiple of the configured value).
Rows whose overrides are all eval.* fields train nothing: the runner evaluates the networks of the
row's other fields again.
"""
import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Patch:
  """cgc.patch as 1/divisor of the bottleneck along each axis (at least 1 cell): the paper's
  12x12x4, 6x6x2 and 3x3x1 are divisors 2, 4 and 8 of its 24x24x8 bottleneck (192x192x64 crops),
  and a smaller crop keeps the same relation."""
  divisor: int


@dataclasses.dataclass(frozen=True)
class Times:
  """A multiple of the configured value (train.steps: Times(2) trains twice as long)."""
  factor: float


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a table.

  name: the row's label in the table (its folder is slug(name)).
  overrides: {'section.field': value, Patch or Times}.
  source: where P comes from (pseudo_labels.source: gmm, threshold, ground_truth, nifti).
  kind: 'train' (trained and evaluated) or 'p' (P alone, scored; overrides are gmm.* fields).
  rounds: self-training: this many rounds, each trained on the previous round's network masks.
  """
  name: str
  overrides: dict = dataclasses.field(default_factory=dict)
  source: str = 'gmm'
  kind: str = 'train'
  rounds: int = 1


def resolve(value, configured, bottleneck):
  """An override's value for the config: Patch and Times resolved against the configured value
  and the bottleneck's cells per axis; anything else as it is."""
  if isinstance(value, Patch):
    return tuple(max(1, b // value.divisor) for b in bottleneck)
  if isinstance(value, Times):
    return type(configured)(configured * value.factor)
  return value


_BACKBONE = {'cgc.coarse': False, 'cgc.fine': False}
_FULL = {'cgc.coarse': True, 'cgc.fine': True}

TABLES = {
    'methods': [
        Row('GMM w/ threshold (P)', kind='p'),
        Row('threshold method (P)', source='threshold', kind='p'),
        Row('backbone + P (GMM)', _BACKBONE),
        Row('full CGC (GMM P)', _FULL),
        Row('full CGC (P from the threshold method)', _FULL, source='threshold'),
        Row('full supervision (P = ground truth)', _BACKBONE, source='ground_truth'),
    ],
    'ablation': [
        Row('backbone + P', _BACKBONE),
        Row('+ global (coarse)', {'cgc.coarse': True, 'cgc.fine': False}),
        Row('+ local (fine)', {'cgc.coarse': False, 'cgc.fine': True}),
        Row('full, z = bottleneck/2 (paper 12x12x4)', dict(_FULL, **{'cgc.patch': Patch(2)})),
        Row('full, z = bottleneck/4 (paper 6x6x2)', dict(_FULL, **{'cgc.patch': Patch(4)})),
        Row('full, z = bottleneck/8 (paper 3x3x1)', dict(_FULL, **{'cgc.patch': Patch(8)})),
    ],
    'temperature': [Row(f'full CGC, tau = {t}', dict(_FULL, **{'cgc.tau': t}))
                    for t in (0.07, 0.1, 0.2, 0.3, 0.7, 0.9)],
    'length': [Row('backbone + P', _BACKBONE), Row('full CGC', _FULL)],
    # whether the CGC module helps at a given geometry (configs/brats_paper_geometry.py), and
    # readings of its fine term beyond the paper's
    'cgc': [Row('backbone + P', _BACKBONE), Row('full CGC', _FULL),
            Row('full CGC, fine term over cells within their mini-patch',
                dict(_FULL, **{'cgc.fine_anchors': 'cell'}))],
    # beyond the paper: learning from noisy P without memorising it (each row one switch on top
    # of the configured recipe)
    'refine': [
        Row('configured recipe'),
        Row('generalised cross-entropy, q = 0.7', {'train.gce_q': 0.7}),
        Row('hard bootstrapping, beta = 0.2', {'train.bootstrap': 0.2}),
        Row('voxel weights from the GMM posterior, gamma = 1', {'train.confidence_gamma': 1.0}),
        Row('self-training, round 2 (trained on round 1\'s masks)', rounds=2),
        Row('twice the steps', {'train.steps': Times(2)}),
        Row('early-learning regularisation, lambda = 3', {'train.elr_lambda': 3.0}),
        Row('cross-fitting, 2 networks on half the cases each, their mean segmenting',
            {'train.folds': 2, 'train.ensemble': 1}),
        # evaluation only (the configured recipe's networks): one of the two is the recipe itself
        Row('the edge from each case\'s mixture, 4 mm', {'eval.border_mm': 4.0}),
        Row('the network\'s own edge (no edge from the mixture)', {'eval.border_mm': 0.0}),
        Row('target correction from half-way, the network\'s own decision where it is 80% sure',
            {'train.correct_threshold': 0.8}),
        Row('P\'s left-right symmetric voxels left out of the loss (FLAIR margin 0.3)',
            {'train.symmetry_margin': 0.3, 'eval.border_symmetry': False}),
        Row('P\'s symmetric voxels counted (no symmetry weights)',
            {'train.symmetry_margin': 0.0, 'eval.border_symmetry': False}),
        Row('an ensemble: 2 networks on every case (seeds s, s + 1000), their mean segmenting',
            {'train.ensemble': 2}),
        Row('P\'s symmetric voxels out of the loss and out of the edge rule',
            {'train.symmetry_margin': 0.3, 'eval.border_symmetry': True}),
    ],
    # every default of the configured recipe, undone one at a time (the first row is the recipe
    # itself, the baseline of the paired comparison every table prints)
    'defaults': [
        Row('configured recipe (every default on)'),
        Row('symmetric voxels keep their say at the edge (eval.border_symmetry off)',
            {'eval.border_symmetry': False}),
        Row('the network\'s own edge (eval.border_mm = 0)',
            {'eval.border_mm': 0.0, 'eval.border_symmetry': False}),
        Row('every component kept (eval.keep_fraction = 0)', {'eval.keep_fraction': 0.0}),
        Row('one network (train.ensemble = 1)', {'train.ensemble': 1}),
        Row('symmetric voxels counted in the loss and at the edge (train.symmetry_margin = 0)',
            {'train.symmetry_margin': 0.0, 'eval.border_symmetry': False}),
        Row('cross-entropy (train.gce_q = 0)', {'train.gce_q': 0.0}),
        Row('half the steps', {'train.steps': Times(0.5)}),
        # what the protocol keeps: only the one-mass rule held; every other default undone at once
        Row('only the defaults that held (one network, cross-entropy, no symmetry or edge rules)',
            {'train.ensemble': 1, 'train.gce_q': 0.0, 'train.symmetry_margin': 0.0,
             'eval.border_symmetry': False, 'eval.border_mm': 0.0}),
        # evaluation only: the edge rule's band voxels keep the network's confidence, mirrored to
        # P's side, instead of a value just past the threshold
        Row('the mixture\'s edge at the network\'s confidence (eval.border_side = reflect)',
            {'eval.border_side': 'reflect'}),
        # the soft-Dice term beside the cross-entropy: the default until 2026-12-08
        Row('the soft-Dice term (train.dice_weight = 1)', {'train.dice_weight': 1.0}),
    ],
    # cases whose P never trained the network that segments them: cross-fitting at k folds
    'transfer': [
        Row('configured recipe'),
        Row('cross-fitting, 2 folds', {'train.ensemble': 1, 'train.folds': 2,
                                       'eval.fold_networks': 'unseen'}),
        Row('cross-fitting, 4 folds', {'train.ensemble': 1, 'train.folds': 4,
                                       'eval.fold_networks': 'unseen'}),
        Row('cross-fitting, 5 folds', {'train.ensemble': 1, 'train.folds': 5,
                                       'eval.fold_networks': 'unseen'}),
        # the same networks as the 2-fold row (evaluation only): both segment every case
        Row('cross-fitting, 2 folds, both networks (their mean)',
            {'train.ensemble': 1, 'train.folds': 2, 'eval.fold_networks': 'all'}),
        Row('cross-fitting, 2 folds, both networks weighed by the unseen one\'s agreement with P',
            {'train.ensemble': 1, 'train.folds': 2, 'eval.fold_networks': 'agreement'}),
        Row('cross-fitting, 5 folds, weighed by the unseen network\'s agreement with P',
            {'train.ensemble': 1, 'train.folds': 5, 'eval.fold_networks': 'agreement'}),
        # each case's loss weighed by 1 - s + s x the label-free quality score of its P
        Row('quality-weighted training (train.quality_weight = 1)',
            {'train.quality_weight': 1.0}),
        Row('quality-weighted training (train.quality_weight = 0.5)',
            {'train.quality_weight': 0.5}),
        # the ensemble's second network guided by the first one (trained on every case's P)
        Row('second network: cases weighed by the first one\'s agreement with P',
            {'train.ensemble_guide': 'cases'}),
        Row('second network: voxels where the first one and P disagree left out',
            {'train.ensemble_guide': 'voxels'}),
    ],
    # not a paper table: how much the CGC terms' weight (both lambdas) matters
    'weights': [Row(f'full CGC, lambda = {w}',
                    dict(_FULL, **{'cgc.lambda_coarse': w, 'cgc.lambda_fine': w}))
                for w in (0.1, 1.0)],
}
TABLE_NAMES = tuple(TABLES) + ('pseudo_labels',)

# The pseudo-label variants (P only, no training): each rule of the pseudo-label stage added in
# turn.
_MRI_SIX = ('flair,t1:4', 'flair,t1:5', 'flair,t1,t2:4', 'flair,t1,t2:5', 'flair,t2:4',
            'flair,t2:5')
_OFF = {'gmm.ensemble': (), 'gmm.open_iterations': 0, 'gmm.keep_fraction': 0.0,
        'gmm.fill_holes': False, 'gmm.grow_mm': 0.0, 'gmm.min_contrast': float('-inf')}
_CLEAN = {'gmm.open_iterations': 1, 'gmm.keep_fraction': 0.1, 'gmm.fill_holes': True}


def p_rows(config) -> list:
  """The `pseudo_labels` table's rows for this config's kind of data (MRI: channel-set consensus;
  CT: one channel, so the consensus is over K)."""
  if config.data.kind == 'ct':
    k = int(config.gmm.k)
    members = tuple(f'ct:{j}' for j in (k - 2, k, k + 2))
    label = f'K = {k - 2}, {k}, {k + 2}'
  else:
    members, label = _MRI_SIX, 'FLAIR+T1, FLAIR+T1+T2, FLAIR+T2 x K = 4, 5'
  rows = [
      ('one mixture (gmm.channels, gmm.k), nothing else', _OFF),
      ('one mixture + cleanup (opening, major components, holes)', dict(_OFF, **_CLEAN)),
      ('one mixture + cleanup + grown 2 mm', dict(_OFF, **_CLEAN, **{'gmm.grow_mm': 2.0})),
      (f'consensus ({label}) + cleanup', dict(_OFF, **_CLEAN, **{'gmm.ensemble': members})),
      (f'consensus ({label}) + cleanup + grown 2 mm',
       dict(_OFF, **_CLEAN, **{'gmm.ensemble': members, 'gmm.grow_mm': 2.0})),
  ]
  if config.data.kind != 'ct':
    rows.append(('consensus with T1ce members too (8) + cleanup + grown 2 mm',
                 dict(_OFF, **_CLEAN, **{'gmm.ensemble': members + ('flair,t1,t1ce,t2:4',
                                                                     'flair,t1,t1ce,t2:5'),
                                         'gmm.grow_mm': 2.0})))
  rows.append(('P as configured', {}))
  if config.data.kind != 'ct':  # scans of several sites on one intensity scale before the mixture
    rows.append(('P as configured, histogram-standardised first (gmm.standardise)',
                 {'gmm.standardise': True}))
  # how the scans are prepared (each row prepares the cases again in its own workdir)
  rows.append(('P as configured, images low-pass filtered before down-sampling (data.antialias)',
               {'data.antialias': True}))
  if config.data.kind != 'ct':
    rows.append(('P as configured, N4 bias-field correction first (data.bias_field)',
                 {'data.bias_field': 'n4'}))
    # the lesion component chosen by several channels (among the FLAIR-bright ones)
    rows.append(('P as configured, lesion component by FLAIR + T2 - T1 (gmm.rule = signature)',
                 {'gmm.rule': 'signature'}))
    rows.append(('P as configured, lesion component by FLAIR - T1 (gmm.rule = signature)',
                 {'gmm.rule': 'signature', 'gmm.signature': ('flair:1', 't1:-1')}))
  return [Row(name, over, kind='p') for name, over in rows]


def channel_rows(spec: str) -> list:
  """'flair,t1;flair,t1,t2' -> pseudo_labels rows with those GMM channel sets (cleanup as
  configured)."""
  return [Row(f'one mixture of {"+".join(ch)} (K as configured) + cleanup',
              dict(_OFF, **_CLEAN, **{'gmm.channels': ch}), kind='p')
          for ch in (tuple(c.strip() for c in g.split(',') if c.strip()) for g in spec.split(';'))
          if ch]


def select_rows(rows: list, spec: str) -> list:
  """'1,3' -> the first and third rows, in table order."""
  picks = sorted({int(v) for v in spec.split(',') if v.strip()})
  if not picks or picks[0] < 1 or picks[-1] > len(rows):
    raise ValueError(f'--rows={spec}: the table has rows 1..{len(rows)}')
  return [rows[i - 1] for i in picks]


def slug(name: str) -> str:
  """A row's folder name: its name in lower case, each run of other characters one '_', at most
  60 characters."""
  keep = re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')
  return keep[:60]


def row_names(table: str) -> dict:
  """{slug: name} of a table's rows."""
  return {slug(r.name): r.name for r in TABLES.get(table, [])}


def in_order(per_row: dict, table: str) -> dict:
  """per_row ({slug: anything}) in the table's order of rows; slugs the table lacks last."""
  order = [slug(r.name) for r in TABLES.get(table, [])]
  return dict(sorted(per_row.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                      else len(order), kv[0])))


# Label-free checkpoint choice, scored on track.jsonl rows: (name, eval.select signal or None).
STOP_RULES = [('last step', None),
              ('first tracked step', 'first'),
              ('max flip agreement', 'flip_agreement'),
              ('min CE on confident P voxels', 'confident_ce'),
              ('min agreement with P', 'p_agreement')]
