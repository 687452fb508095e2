"""Config fields outside their choices or ranges stop the command before anything is written."""
import glob
import importlib
import os
import subprocess
import sys

import pytest

from cgc_jax import errors
from cgc_jax import pipeline
from cgc_jax.core import config_rules

from conftest import ROOT
from conftest import tiny_config


@pytest.mark.parametrize('name', sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'common.py')) + ['tiny'])
def test_every_shipped_config_passes(name):
  assert config_rules.problems(importlib.import_module(name).get_config()) == []


def test_every_bad_field_is_named_with_what_it_accepts():
  c = tiny_config(**{'cgc.fine_anchors': 'cells', 'model.norm': 'batch', 'eval.keep_fraction': 1.5,
                     'train.steps': 0, 'train.bootstrap': 1.0, 'gmm.threshold': 1.0})
  assert config_rules.problems(c) == [
      "model.norm: 'batch' (expected one of instance | group)",
      "cgc.fine_anchors: 'cells' (expected one of patch | cell)",
      'gmm.threshold: 1.0 (expected a number in (0.0, 1.0))',
      'train.steps: 0 (expected a number in [1, inf))',
      'train.bootstrap: 1.0 (expected a number in [0.0, 1.0))',
      'eval.keep_fraction: 1.5 (expected a number in [0.0, 1.0])',
  ]
  with pytest.raises(errors.ConfigError, match=r'6 bad fields:\n  model.norm'):
    config_rules.check(c)
  # the edges of the ranges: included where they say so
  ok = tiny_config(**{'eval.keep_fraction': 1.0, 'train.gce_q': 0.0, 'train.steps': 1})
  assert config_rules.problems(ok) == []
  # fields that must agree: averaging needs the checkpoints kept
  assert config_rules.problems(tiny_config(**{'eval.average_checkpoints': 4,
                                              'train.keep_checkpoints': 3})) == [
      'eval.average_checkpoints: 4 (expected at most train.keep_checkpoints = 3)']
  assert config_rules.problems(tiny_config(**{'eval.average_checkpoints': 3,
                                              'train.keep_checkpoints': 3})) == []
  # cross-fitting: a whole number of networks, each evaluated at its latest checkpoint
  assert config_rules.problems(tiny_config(**{'train.folds': 0})) == [
      'train.folds: 0 (expected a number in [1, inf))']
  c = tiny_config()
  with c.ignore_type():  # as a config read back from a workdir's JSON may have it
    c.train.folds = 2.5
  assert config_rules.problems(c) == ['train.folds: 2.5 (expected a whole number of networks)']
  assert config_rules.problems(tiny_config(**{'train.folds': 2, 'eval.every_steps': 5})) == [
      'train.folds: 2 (several networks: each keeps its latest checkpoint, so expected '
      'eval.every_steps = 0 and eval.select = latest, got 5 and latest)']
  assert config_rules.problems(tiny_config(**{'train.folds': 2})) == []
  assert config_rules.problems(tiny_config(**{'train.folds': 1, 'eval.every_steps': 5})) == []
  # an ensemble: the same, and not together with cross-fitting
  assert config_rules.problems(tiny_config(**{'train.ensemble': 0})) == [
      'train.ensemble: 0 (expected a number in [1, inf))']
  assert config_rules.problems(tiny_config(**{'train.ensemble': 3,
                                              'eval.select': 'flip_agreement'})) == [
      'train.ensemble: 3 (several networks: each keeps its latest checkpoint, so expected '
      'eval.every_steps = 0 and eval.select = latest, got 0 and flip_agreement)']
  assert config_rules.problems(tiny_config(**{'train.ensemble': 2, 'train.folds': 2})) == [
      'train.ensemble: 2 (expected 1 with train.folds = 2: cross-fitting and an ensemble are two '
      'ways to train several networks; choose one)']
  assert config_rules.problems(tiny_config(**{'train.ensemble': 2})) == []
  # the zoom range: two positive factors, low first
  for bad in ((1.15, 0.85), (0.0, 1.0), (1.0,)):
    assert config_rules.problems(tiny_config(**{'train.zoom': bad})) == [
        f'train.zoom: {bad!r} (expected (low, high) with 0 < low <= high)']
  assert config_rules.problems(tiny_config(**{'train.zoom': (1.0, 1.0)})) == []
  # the border refinement: a distance, and a mixture to refit on new scans
  assert config_rules.problems(tiny_config(**{'eval.border_mm': -1.0})) == [
      'eval.border_mm: -1.0 (expected a number in [0.0, inf))']
  assert config_rules.problems(tiny_config(**{'eval.border_mm': 4.0,
                                              'pseudo_labels.source': 'nifti'})) == [
      "eval.border_mm: 4.0 (the border refinement refits the mixture on new scans: expected "
      "pseudo_labels.source = gmm, got 'nifti')"]
  assert config_rules.problems(tiny_config(**{'eval.border_mm': 4.0})) == []
  assert config_rules.problems(tiny_config(**{'eval.border_mm': 0.0,
                                              'pseudo_labels.source': 'nifti'})) == []
  # the symmetry weights: a margin, and a modality the data has
  assert config_rules.problems(tiny_config(**{'train.symmetry_margin': -0.3})) == [
      'train.symmetry_margin: -0.3 (expected a number in [0.0, inf))']
  assert config_rules.problems(tiny_config(**{'train.symmetry_margin': 0.3,
                                              'train.symmetry_modality': 'dwi'})) == [
      "train.symmetry_modality: 'dwi' (expected one of data.modalities ['flair', 't1', 't1ce', "
      "'t2'] while train.symmetry_margin > 0)"]
  assert config_rules.problems(tiny_config(**{'train.symmetry_modality': 'dwi'})) == []  # off
  assert config_rules.problems(tiny_config(**{'train.symmetry_margin': 0.3})) == []
  # the edge rule's symmetric voxels are the training rule's: it must be on
  assert config_rules.problems(tiny_config(**{'eval.border_symmetry': True})) == [
      "eval.border_symmetry: True (P's symmetric voxels are train.symmetry_margin's: expected "
      "train.symmetry_margin > 0, got 0.0)"]
  assert config_rules.problems(tiny_config(**{'eval.border_symmetry': True,
                                              'train.symmetry_margin': 0.3})) == []
  # the signature rule: MRI only, and items 'channel:weight'
  assert config_rules.problems(tiny_config(**{'gmm.rule': 'signature'})) == []
  assert config_rules.problems(tiny_config(**{'gmm.rule': 'signature',
                                              'gmm.signature': ('flair:1', 't1=-1')})) == [
      "gmm.signature: 't1=-1' (expected items \"channel:weight\", e.g. \"t1:-1\")"]
  assert config_rules.problems(tiny_config(**{'gmm.signature': ('t1=-1',)})) == []  # rule off
  assert config_rules.problems(tiny_config(**{'gmm.rule': 'signature', 'data.kind': 'ct'})) == [
      "gmm.rule: 'signature' (it reads z-scores of MRI channels: expected 'hu_range' or "
      "'max_mean' with data.kind = ct)"]
  # the devices cut unrotated crops
  assert config_rules.problems(tiny_config(**{'train.crops_on': 'device',
                                              'train.spatial_p': 0.5})) == [
      "train.crops_on: 'device' (the devices cut unrotated crops: expected train.spatial_p = 0, "
      "got 0.5, or train.crops_on = 'host')"]
  assert config_rules.problems(tiny_config(**{'train.crops_on': 'device'})) == []
  assert config_rules.problems(tiny_config(**{'train.crops_on': 'gpu'})) == [
      "train.crops_on: 'gpu' (expected one of auto | host | device)"]
  # a field an older workdir's config lacks is not checked
  del ok.cgc['fine_anchors']
  assert config_rules.problems(ok) == []


def test_the_choices_are_what_the_stages_accept():
  from cgc_jax.inference import tracking  # pylint: disable=g-import-not-at-top
  from cgc_jax.model import onednn  # pylint: disable=g-import-not-at-top
  from cgc_jax.model import unet  # pylint: disable=g-import-not-at-top
  assert config_rules.CHOICES['eval.select'] == ('latest',) + tuple(tracking.SELECT_RULES)
  for impl in config_rules.CHOICES['model.conv_impl']:
    if impl != 'onednn' or onednn.available():  # 'onednn' by name raises where it is not built
      unet.resolve_conv_impl(impl)  # raises on an unknown one
  with pytest.raises(ValueError):
    unet.resolve_conv_impl('winograd')
  for dtype in config_rules.CHOICES['model.dtype']:
    unet.build(tiny_config(**{'model.dtype': dtype}).model)  # a KeyError on an unknown one
  from cgc_jax.imaging import morphology  # pylint: disable=g-import-not-at-top
  assert config_rules.CHOICES['eval.border_side'] == morphology.BORDER_SIDES


def test_a_bad_field_stops_run_before_the_workdir_exists(tmp_path):
  wd = str(tmp_path / 'never')
  with pytest.raises(errors.ConfigError, match="train.loss_region: 'brains'"):
    pipeline.run(tiny_config(**{'train.loss_region': 'brains'}), wd, 'all')
  assert not os.path.exists(wd)


def test_the_command_line_says_it_in_one_line_and_exits_2(tmp_path):
  wd = str(tmp_path / 'never')
  r = subprocess.run(
      [sys.executable, '-m', 'cgc_jax.main', f'--config={os.path.join(ROOT, "tests", "tiny.py")}',
       f'--workdir={wd}', '--config.cgc.fine_anchors=cells'], cwd=ROOT, capture_output=True,
      text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert "cgc_jax: error: config: cgc.fine_anchors: 'cells' (expected one of patch | cell)" in \
      r.stderr
  assert not os.path.exists(wd)
