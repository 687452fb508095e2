"""End to end on tiny phantoms: prepare -> pseudo_labels -> train -> evaluate -> predict."""
import json
import os
import shutil
import subprocess
import sys

from absl import logging
import nibabel as nib
import numpy as np
import pytest

from cgc_jax import pipeline
from cgc_jax.core import workdir as workdir_lib

from conftest import ROOT
from conftest import tiny_config


@pytest.mark.slow
def test_all_stages_end_to_end_then_skip_then_predict(tmp_path):
  wd = str(tmp_path / 'wd')
  cfg = tiny_config(**{'eval.pictures': True})
  logging.set_verbosity(logging.INFO)  # as under the command line (absl's app.run)
  pipeline.run(cfg, wd, 'all')
  with open(os.path.join(wd, 'eval', 'summary.json')) as f:
    summary = json.load(f)
  assert set(summary['summary']) == {'GMM w/ threshold (P)', 'CGC network'}
  assert summary['checkpoint_step'] == cfg.train.steps
  md = open(os.path.join(wd, 'eval', 'summary.md')).read()
  assert '| GMM w/ threshold (P) | 3 |' in md and '| CGC network | 3 |' in md
  assert os.path.exists(os.path.join(wd, 'eval', 'pictures', 'dice.png'))
  assert len([p for p in os.listdir(os.path.join(wd, 'eval', 'pictures'))]) == 4
  # every prediction has the shape and affine of its input scan
  for case in sorted(os.listdir(os.path.join(wd, 'phantoms'))):
    if not case.startswith('phantom_'):
      continue
    src = nib.load(os.path.join(wd, 'phantoms', case, f'{case}_flair.nii.gz'))
    for out in (os.path.join(wd, 'eval', 'predictions', f'{case}.nii.gz'),
                os.path.join(wd, 'pseudo_labels', 'nifti', f'{case}.nii.gz')):
      pred = nib.load(out)
      assert pred.shape == src.shape and pred.get_data_dtype() == np.uint8
      np.testing.assert_allclose(pred.affine, src.affine)
  # the GMM row equals the stage's own P metrics
  with open(os.path.join(wd, 'pseudo_labels', 'summary.json')) as f:
    p_summary = json.load(f)['summary']
  assert abs(p_summary['dice']['mean'] -
             summary['summary']['GMM w/ threshold (P)']['dice']['mean']) < 1e-9
  # the run's resolved config and its log are kept in the workdir
  with open(os.path.join(wd, 'config.json')) as f:
    assert json.load(f)['train']['steps'] == cfg.train.steps
  log = open(os.path.join(wd, 'log.txt')).read()
  assert 'prepare: 3 cases' in log and 'evaluation (3 cases with ground truth)' in log
  # a second `all` finds everything done and current: not one output is rewritten
  before = _mtimes(wd)
  pipeline.run(cfg, wd, 'all')
  assert _mtimes(wd) == before
  # predict: new scans (here the phantom folder) -> masks on their own grids, no labels needed
  cfg.eval.input_root = os.path.join(wd, 'phantoms')
  with workdir_lib.WorkdirLock(wd, 'train'):  # beside a training run that holds the workdir
    pipeline.run(cfg, wd, 'predict')
    assert os.path.exists(os.path.join(wd, '.lock'))  # still the training run's
  with open(os.path.join(wd, 'config.json')) as f:  # ... and so is config.json
    assert json.load(f)['eval']['input_root'] == ''
  masks = sorted(m for m in os.listdir(os.path.join(wd, 'predict', 'masks')) if m.endswith('.gz'))
  assert len(masks) == 3
  assert sorted(os.listdir(os.path.join(wd, 'predict', 'masks', 'pictures'))) == [
      m.replace('.nii.gz', '.png') for m in masks]
  a = nib.load(os.path.join(wd, 'predict', 'masks', masks[0])).get_fdata()
  b = nib.load(os.path.join(wd, 'eval', 'predictions', masks[0])).get_fdata()
  np.testing.assert_array_equal(a, b)

  # a second folder of new scans that repeats a case id: its own scan is prepared and predicted
  # (before: the first folder's prepared case was reused, and the mask had the other scan's grid)
  case = masks[0][:-len('.nii.gz')]
  other = str(tmp_path / 'other')
  _pad_case(os.path.join(wd, 'phantoms', case), os.path.join(other, case), case)
  cfg.eval.input_root = other
  pipeline.run(cfg, wd, 'predict')
  got = nib.load(os.path.join(wd, 'predict', 'masks', masks[0]))
  want = nib.load(os.path.join(other, case, f'{case}_flair.nii.gz'))
  assert got.shape == want.shape != src.shape
  np.testing.assert_allclose(got.affine, want.affine)

  # a scan replaced at the same path: that case (only) is prepared, labelled and evaluated again
  cfg.eval.input_root = ''
  _pad_case(os.path.join(other, case), os.path.join(wd, 'phantoms', case), case)
  prep_meta = {c: os.stat(os.path.join(wd, 'prepared', 'cases', c, 'meta.json')).st_mtime_ns
               for c in os.listdir(os.path.join(wd, 'prepared', 'cases'))}
  p_meta = {c: os.stat(os.path.join(wd, 'pseudo_labels', 'cases', c, 'meta.json')).st_mtime_ns
            for c in prep_meta}
  pipeline.run(cfg, wd, 'all')
  for c in prep_meta:
    changed = os.stat(os.path.join(wd, 'prepared', 'cases', c, 'meta.json')).st_mtime_ns != \
        prep_meta[c]
    p_changed = os.stat(os.path.join(wd, 'pseudo_labels', 'cases', c, 'meta.json')).st_mtime_ns != \
        p_meta[c]
    assert changed == p_changed == (c == case), c
  new = nib.load(os.path.join(wd, 'phantoms', case, f'{case}_flair.nii.gz')).shape  # padded twice
  with open(os.path.join(wd, 'prepared', 'cases', case, 'meta.json')) as f:
    assert tuple(json.load(f)['geometry']['original_shape']) == new != want.shape
  assert nib.load(os.path.join(wd, 'eval', 'predictions', masks[0])).shape == new


def _mtimes(wd) -> dict:
  """mtime_ns of every file under the stage folders of a workdir (logs excluded)."""
  out = {}
  for d in ('prepared', 'pseudo_labels', 'checkpoints', 'eval'):
    for root, _, files in os.walk(os.path.join(wd, d)):
      for f in files:
        out[os.path.join(root, f)] = os.stat(os.path.join(root, f)).st_mtime_ns
  assert len(out) > 20
  return out


@pytest.mark.slow
def test_predict_from_the_command_line_with_only_the_workdir(tiny_trained, tmp_path):
  """`cgc-jax --mode=predict` without --config: the model and its config come from the workdir; one
  case folder in, its mask (on its own grid) and probability map out."""
  case = 'phantom_mri_000'
  src = os.path.join(tiny_trained, 'phantoms', case)
  out = str(tmp_path / 'masks')
  r = subprocess.run([sys.executable, '-m', 'cgc_jax.main', '--mode=predict',
                      f'--workdir={tiny_trained}', f'--input={src}', f'--output={out}',
                      '--probabilities'], capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  flair = nib.load(os.path.join(src, f'{case}_flair.nii.gz'))
  mask = nib.load(os.path.join(out, f'{case}.nii.gz'))
  prob = nib.load(os.path.join(out, f'{case}_prob.nii.gz'))
  for img in (mask, prob):
    assert img.shape == flair.shape
    np.testing.assert_allclose(img.affine, flair.affine)
  p = prob.get_fdata()
  assert 0.0 <= p.min() and p.max() <= 1.0
  # the mask is the probability map thresholded at 0.5 (no component filter in this config)
  np.testing.assert_array_equal(mask.get_fdata() > 0, p > 0.5)
  # and the same scan through the workdir's own evaluation gives the same mask
  np.testing.assert_array_equal(
      mask.get_fdata(), nib.load(os.path.join(tiny_trained, 'eval', 'predictions',
                                              f'{case}.nii.gz')).get_fdata())
  # without --config any other mode is a usage error
  r = subprocess.run([sys.executable, '-m', 'cgc_jax.main', '--mode=evaluate',
                      f'--workdir={tiny_trained}'], capture_output=True, text=True, cwd=ROOT,
                     timeout=300)
  assert r.returncode != 0 and '--config is required' in r.stderr


def _stage_mtimes(wd) -> dict:
  """Per stage, the mtimes of its outputs."""
  out = {}
  for stage, d in (('prepare', 'prepared'), ('pseudo_labels', 'pseudo_labels'),
                   ('train', 'checkpoints'), ('evaluate', 'eval')):
    out[stage] = {k: v for k, v in _mtimes(wd).items() if k.startswith(os.path.join(wd, d) + '/')}
  return out


@pytest.mark.slow
def test_a_changed_field_reruns_its_stage_and_what_follows_only(tmp_path):
  wd = str(tmp_path / 'wd')
  cfg = tiny_config(**{'eval.pictures': False, 'pseudo_labels.export_nifti': False})
  pipeline.run(cfg, wd, 'all')
  before = _stage_mtimes(wd)
  # worker counts change nothing that is computed: nothing runs again
  pipeline.run(tiny_config(**{'eval.pictures': False, 'pseudo_labels.export_nifti': False,
                              'data.num_workers': 1, 'train.num_workers': 1}), wd, 'all')
  assert _stage_mtimes(wd) == before
  # output switches turned on after the run: their outputs appear, nothing is recomputed
  cfg = tiny_config(**{'eval.pictures': True, 'pseudo_labels.export_nifti': True})
  pipeline.run(cfg, wd, 'all')
  cases = sorted(os.listdir(os.path.join(wd, 'prepared', 'cases')))
  assert sorted(os.listdir(os.path.join(wd, 'pseudo_labels', 'nifti'))) == [
      f'{c}.nii.gz' for c in cases]
  assert {f'{c}.png' for c in cases} <= set(os.listdir(os.path.join(wd, 'eval', 'pictures')))
  after = _stage_mtimes(wd)
  for stage in ('prepare', 'train'):
    assert after[stage] == before[stage], stage
  for f, t in before['pseudo_labels'].items():  # the shards themselves untouched
    assert after['pseudo_labels'][f] == t, f
  # an evaluation field: only the evaluation runs again
  before = after
  cfg.eval.overlap = 0.25
  pipeline.run(cfg, wd, 'all')
  after = _stage_mtimes(wd)
  assert [s for s in before if after[s] != before[s]] == ['evaluate']
  # a pseudo-label field: P, training and evaluation run again; the prepared data stay
  before = after
  cfg.gmm.seed = 7
  pipeline.run(cfg, wd, 'all')
  after = _stage_mtimes(wd)
  assert [s for s in before if after[s] != before[s]] == ['pseudo_labels', 'train', 'evaluate']


def _pad_case(src_dir, dst_dir, case):
  """Copies a phantom case with every volume padded by 2 voxels on each side of each axis."""
  os.makedirs(dst_dir, exist_ok=True)
  for name in os.listdir(src_dir):
    img = nib.load(os.path.join(src_dir, name))
    data = np.pad(np.asarray(img.dataobj), 2)
    aff = img.affine.copy()
    aff[:3, 3] -= aff[:3, :3] @ np.array([2.0, 2.0, 2.0])
    nib.save(nib.Nifti1Image(data, aff), os.path.join(dst_dir, name))


def test_every_shipped_config_is_consistent():
  """Each configs/*.py loads; its crop fits the U-Net's poolings and its mini-patch the
  bottleneck."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  names = sorted(f for f in os.listdir(root) if f.endswith('.py') and f != 'common.py'
                 and not f.startswith('_'))
  assert {'brats.py', 'brats_sample.py', 'cq500.py', 'ct_phantoms.py', 'demo.py'} <= set(names)
  for name in names:
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(root, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    s = 2**(c.model.levels - 1)
    assert all(v % s == 0 for v in c.train.crop), name
    bottleneck = [v // s for v in c.train.crop]
    assert all(1 <= p <= b for p, b in zip(c.cgc.patch, bottleneck)), (name, c.cgc.patch,
                                                                       bottleneck)
    assert c.train.batch_size >= 1 and c.train.steps >= 1, name
    assert set(c.gmm.channels) <= set(c.data.modalities), name


def test_config_names_resolve_to_shipped_configs_and_paths_stay():
  demo = os.path.join(ROOT, 'configs', 'demo.py')
  assert pipeline.resolve_config(['x', '--config=demo', '--workdir=w']) == [
      'x', f'--config={demo}', '--workdir=w']
  assert pipeline.resolve_config(['--config=demo:small']) == [f'--config={demo}:small']
  assert pipeline.resolve_config(['--config=configs/demo.py']) == ['--config=configs/demo.py']
  assert pipeline.resolve_config(['--config=nosuch']) == ['--config=nosuch'
                                                         ]  # absl names the problem
  assert pipeline.resolve_config(['--config.train.steps=3']) == ['--config.train.steps=3']


def test_every_user_facing_error_lives_in_errors():
  # pylint: disable-next=g-import-not-at-top
  from cgc_jax import errors
  from cgc_jax.core import store
  from cgc_jax.imaging import readers
  from cgc_jax.labels import gmm
  from cgc_jax.runtime import workers
  from cgc_jax.stages import prepare
  assert readers.DataError is errors.DataError and prepare.StageError is errors.StageError
  assert store.CorruptShardError is errors.CorruptShardError and gmm.GMMError is errors.GMMError
  assert workers.CaseFailure is errors.CaseFailure and pipeline.WorkdirError is errors.WorkdirError
  assert pipeline.USER_ERRORS == errors.USER_ERRORS
  assert {e.__module__ for e in errors.USER_ERRORS} == {'cgc_jax.errors'}


def test_source_lines_within_100_columns():
  """The formatter's column limit (pyproject.toml [tool.yapf]) holds for code, comments and docs."""
  import glob  # pylint: disable=g-import-not-at-top
  files = sorted(p for d in ('cgc_jax', 'configs', 'tests')
                 for p in glob.glob(os.path.join(ROOT, d, '**', '*.py'), recursive=True))
  long = [f'{os.path.relpath(p, ROOT)}:{i}' for p in files
          for i, line in enumerate(open(p, encoding='utf-8').read().split('\n'), 1)
          if len(line) > 100]
  assert len(files) > 40
  assert not long, long


@pytest.mark.slow
def test_pip_install_gives_the_cgc_jax_command(tiny_trained, tmp_path):
  """`pip install .` into a venv: the `cgc-jax` console script runs from another folder, finds the
  packaged configs by name, and predicts with only a workdir."""
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
  # the new venv sees the packages of the interpreter running the tests (a venv's or the system's:
  # --system-site-packages would see the base interpreter's, which a venv's tests do not use)
  import site  # pylint: disable=g-import-not-at-top
  import sysconfig  # pylint: disable=g-import-not-at-top
  here = [p for p in site.getsitepackages() + [sysconfig.get_paths()['purelib']]
          if os.path.isdir(p)]
  r = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                      'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                     capture_output=True, text=True, check=True, timeout=60)
  with open(os.path.join(r.stdout.strip(), 'running_tests.pth'), 'w') as f:
    f.write('\n'.join(dict.fromkeys(here)) + '\n')
  r = subprocess.run([str(venv / 'bin' / 'python'), '-m', 'pip', 'install', '-q', '--no-deps',
                      ROOT], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  code = ('import cgc_jax, cgc_jax.pipeline as p; print(cgc_jax.__file__); '
          'print(p.resolve_config(["--config=demo"])[0])')
  r = subprocess.run([str(venv / 'bin' / 'python'), '-c', code], capture_output=True, text=True,
                     cwd=str(elsewhere), env=env, timeout=120)
  where, resolved = r.stdout.split()
  assert str(venv) in where and not where.startswith(ROOT)  # the installed copy, not the checkout
  assert resolved.startswith('--config=' + os.path.dirname(where)) and resolved.endswith('demo.py')
  # the oneDNN convolution's source ships too (built on first use where oneDNN is installed)
  assert os.path.isfile(os.path.join(os.path.dirname(where), 'model', 'native', 'onednn_conv.cc'))
  case = 'phantom_mri_001'
  r = subprocess.run([str(venv / 'bin' / 'cgc-jax'), '--mode=predict', f'--workdir={tiny_trained}',
                      f'--input={os.path.join(tiny_trained, "phantoms", case)}', '--output=masks'],
                     capture_output=True, text=True, cwd=str(elsewhere), env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = nib.load(str(elsewhere / 'masks' / f'{case}.nii.gz'))
  want = nib.load(os.path.join(tiny_trained, 'eval', 'predictions', f'{case}.nii.gz'))
  np.testing.assert_array_equal(got.get_fdata(), want.get_fdata())
  np.testing.assert_allclose(got.affine, want.affine)


@pytest.mark.slow
def test_ground_truth_changes_no_p_no_parameter_and_no_mask(tiny_trained, tmp_path):
  """The tiny pipeline with and without the label files: the same P, the same trained parameters
  bit for bit and the same masks. Ground truth is read for scoring only."""
  import glob  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from cgc_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cgc_jax.inference import restore  # pylint: disable=g-import-not-at-top
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  with_gt, without = tiny_trained, str(tmp_path / 'no_labels')
  shutil.copytree(os.path.join(with_gt, 'phantoms'), os.path.join(without, 'phantoms'))
  labels = glob.glob(os.path.join(without, 'phantoms', '*', '*_seg.nii.gz'))
  assert len(labels) == 3
  for f in labels:
    os.remove(f)
  cfg = tiny_config(**{'eval.pictures': False})
  pipeline.run(cfg, without, 'all')
  cases = paths.prepared_store(cfg, with_gt).complete_cases()
  assert cases == paths.prepared_store(cfg, without).complete_cases()
  assert not any(paths.reference_store(cfg, without).is_complete(c) for c in cases)
  for c in cases:
    np.testing.assert_array_equal(np.asarray(paths.pl_store(cfg, with_gt).read(c, 'p')),
                                  np.asarray(paths.pl_store(cfg, without).read(c, 'p')))
  mesh = distributed.mesh()
  a = restore.restore_params(cfg, with_gt, mesh, 4)[0]
  b = restore.restore_params(cfg, without, mesh, 4)[0]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for c in cases:
    masks = [np.asarray(nib.load(os.path.join(w, 'eval', 'predictions', f'{c}.nii.gz')).dataobj)
             for w in (with_gt, without)]
    np.testing.assert_array_equal(masks[0], masks[1])
  assert any(m.any() for m in masks)
  # the label files added afterwards, one of them damaged: the run is re-scored only (no shard
  # re-prepared, no P recomputed, no step trained, no mask predicted again), the damaged label
  # is a warning that leaves its case unscored, and the other cases score as with labels from
  # the start
  def stamps():
    return {f: os.stat(f).st_mtime_ns
            for d in ('prepared', 'pseudo_labels/cases', 'checkpoints', 'eval/predictions')
            for f in glob.glob(os.path.join(without, d, '**', '*'), recursive=True)
            if os.path.isfile(f)}
  before = stamps()
  for f in sorted(labels):
    shutil.copy(f.replace(without, with_gt), f)
  damaged = sorted(labels)[0]
  with open(damaged, 'wb') as fh:
    fh.write(b'not a NIfTI file')
  pipeline.run(cfg, without, 'all')
  assert stamps() == before and len(before) > 20
  refs = paths.reference_store(cfg, without)
  scored = [c for c in cases if refs.is_complete(c)]
  assert len(scored) == 2 and os.path.basename(os.path.dirname(damaged)) not in scored
  rows = {}
  for w in (with_gt, without):
    with open(os.path.join(w, 'eval', 'summary.json')) as fh:
      rows[w] = {r['case']: r for r in json.load(fh)['cases']}
  assert sorted(rows[without]) == scored
  keys = ('net_dice', 'p_dice', 'net_assd', 'p_hd95', 'net_ref_voxels')
  np.testing.assert_equal([[rows[without][c][k] for k in keys] for c in scored],
                          [[rows[with_gt][c][k] for k in keys] for c in scored])
