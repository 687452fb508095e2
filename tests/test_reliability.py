"""The fault and bad-input catalogue: each entry is a test (README "Reliability" lists them).

Nothing lost, nothing half-written, every error names its cause. Non-finite losses and the SIGTERM
resume of the same data order are in test_train.py; a SIGKILLed prepare in test_prepare.py.
"""
import collections
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import nibabel as nib
import numpy as np
import pytest

import fuzz_nifti
from cgc_jax import pipeline
from cgc_jax.core import paths
from cgc_jax.core import workdir as workdir_lib
from cgc_jax.imaging import readers
from cgc_jax.model import checkpoint
from cgc_jax.model import train_state
from cgc_jax.stages import evaluate
from cgc_jax.stages import prepare
from cgc_jax.stages import train

from conftest import ROOT
from conftest import copy_inputs
from conftest import tiny_config

TINY = os.path.join(ROOT, 'tests', 'tiny.py')


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'  # as this process: same programs
  return env


def _main(wd, *args, preexec=None, timeout=600):
  return subprocess.run(
      [sys.executable, '-m', 'cgc_jax.main', f'--config={TINY}', f'--workdir={wd}', *args],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
      preexec_fn=preexec)


@pytest.fixture(scope='module')
def fuzzed(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('fuzz'))
  return root, fuzz_nifti.write_dataset(root, seed=0)


def _folder_config(root):
  c = tiny_config(**{'data.layout': 'folder', 'data.root': root})
  return c


def test_fuzzed_nifti_every_one_handled_in_process(fuzzed):
  root, broken = fuzzed
  assert len(broken) >= 200
  cfg = _folder_config(root)
  files = {f.case_id: f for f in readers.discover(cfg.data)}
  outcome = collections.Counter()
  unhandled = []
  for f in broken:
    try:
      r = prepare.prepare_case(files[f.case_id], cfg.data, '', '', write=False)
      outcome['loaded'] += 1
      if f.must_fail:
        unhandled.append(f'{f.case_id}: loaded, but must be refused')
      if f.must_fail is False and not any(f.path in w for w in r['warnings']):
        unhandled.append(f'{f.case_id}: loaded without a warning naming {f.path}: {r["warnings"]}')
    except readers.DataError as e:
      msg = str(e)
      if f.path not in msg or '\n\n' in msg or 'Traceback' in msg:
        unhandled.append(f'{f.case_id}: unclear error {msg[:300]!r}')
      outcome['refused'] += 1
    except Exception as e:  # pylint: disable=broad-except
      unhandled.append(f'{f.case_id}: {type(e).__name__}: {e}')
  print(f'fuzzed NIfTI: {len(broken)} tried, {outcome["refused"]} refused naming the file, '
        f'{outcome["loaded"]} still valid (harmless header bytes), {len(unhandled)} unhandled')
  assert not unhandled, '\n'.join(unhandled)
  for case in fuzz_nifti.GOOD:  # the good cases load
    prepare.prepare_case(files[case], cfg.data, '', '', write=False)


@pytest.mark.slow
def test_fuzzed_nifti_verify_prepare_predict_from_the_command_line(fuzzed, tiny_workdir, tmp_path):
  root, broken = fuzzed
  must_fail = [f for f in broken if f.must_fail]
  data = [
      f'--config.data.layout=folder', f'--config.data.root={root}', '--config.data.num_workers=2'
  ]
  # verify: exit 2, every bad file named, no traceback, nothing written (not even the workdir)
  wd = str(tmp_path / 'verify')
  r = _main(wd, '--mode=verify', *data)
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  missed = [f.path for f in must_fail if f.path not in r.stderr]
  assert not missed, missed[:5]
  assert not os.path.exists(wd)
  # prepare: the same, and the good cases are prepared, the bad ones not at all
  wd = str(tmp_path / 'prepare')
  r = _main(wd, '--mode=prepare', *data)
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert not [f.path for f in must_fail if f.path not in r.stderr]
  store = paths.prepared_store(_folder_config(root), wd)
  done = set(store.complete_cases())
  assert set(fuzz_nifti.GOOD) <= done and not done & {f.case_id for f in must_fail}
  assert not [n for n in os.listdir(os.path.join(wd, 'prepared', 'cases')) if n.startswith('.tmp')]
  assert json.load(open(os.path.join(wd, 'prepared', 'manifest.json')))['cases'] == sorted(done)
  # --verbose shows the traceback
  r = _main(wd, '--mode=prepare', '--verbose', *data)
  assert r.returncode != 0 and 'Traceback' in r.stderr
  # predict on the same folder: masks for the readable scans, an error naming the rest
  wd = str(tmp_path / 'predict')
  copy_inputs(tiny_workdir, wd)
  train.train_and_evaluate(tiny_config(), wd)
  r = _main(wd, '--mode=predict', f'--config.eval.input_root={root}')
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert not [f.path for f in must_fail if f.path not in r.stderr]
  masks = {m[:-len('.nii.gz')] for m in os.listdir(os.path.join(wd, 'predict', 'masks'))
           if m.endswith('.nii.gz')}
  assert set(fuzz_nifti.GOOD) <= masks and not masks & {f.case_id for f in must_fail}
  src = nib.load(fuzz_nifti.paths(root, 'good_0')['flair'])
  assert nib.load(os.path.join(wd, 'predict', 'masks', 'good_0.nii.gz')).shape == src.shape


def _wait_for(path, text, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and text in open(path, errors='replace').read():
      return
    assert proc.poll(
    ) is None, f'exited {proc.returncode} before {text!r}:\n' + open(path).read()[-3000:]
    time.sleep(0.01)
  raise AssertionError(f'{text!r} never appeared')


@pytest.mark.slow
def test_kill_9_at_any_moment_then_the_same_command_completes(tiny_workdir, tiny_trained,
                                                              tmp_path):
  """kill -9 during prepare, pseudo_labels, a train step, an async checkpoint save and evaluation;
  SIGTERM during training exits 0; the same command then finishes with what one clean run gives."""
  wd = str(tmp_path / 'wd')
  shutil.copytree(os.path.join(tiny_workdir, 'phantoms'), os.path.join(wd, 'phantoms'))  # inputs
  args = [sys.executable, '-m', 'cgc_jax.main', f'--config={TINY}', f'--workdir={wd}']
  rng = np.random.default_rng(0)
  # (log text that starts the moment, signal, longest random delay after it); a step takes ~0.1 s
  moments = [('prepare: 1/', signal.SIGKILL, 0.1), ('pseudo_labels: 1/', signal.SIGKILL, 0.3),
             ('train step ', signal.SIGKILL, 0.05),  # in this run's first steps
             ('train step ', signal.SIGTERM, 0.05),  # preemption: save the current step, exit 0
             ('train step 6/', signal.SIGKILL, 0.05),  # during the final async checkpoint save
             ('predict: 1/', signal.SIGKILL, 0.1)]
  for i, (text, sig, delay) in enumerate(moments):
    log = str(tmp_path / f'run{i}.log')
    with open(log, 'w') as fh:
      proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=fh, stderr=fh)
    try:
      _wait_for(log, text, proc)
      time.sleep(rng.uniform(0, delay))
      proc.send_signal(sig)
      rc = proc.wait(timeout=120)
    finally:
      proc.kill()
    if sig == signal.SIGTERM:
      assert rc == 0 and 'SIGTERM: saved step' in open(log).read(), open(log).read()[-2000:]
    else:
      assert rc == -signal.SIGKILL, (text, rc)
    assert os.path.exists(os.path.join(wd, '.lock')) == (rc != 0)  # a killed run leaves its lock
  r = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'clearing a stale lock' in r.stderr and not os.path.exists(os.path.join(wd, '.lock'))
  cfg = tiny_config()
  # P identical to an uninterrupted run's; no temporary shard left
  ref, got = paths.pl_store(cfg, tiny_workdir), paths.pl_store(cfg, wd)
  for c in ref.complete_cases():
    np.testing.assert_array_equal(got.read(c, 'p'), ref.read(c, 'p'))
  for d in ('prepared', 'pseudo_labels'):
    assert not [n for n in os.listdir(os.path.join(wd, d, 'cases')) if n.startswith('.tmp')]
  # final parameters identical to an uninterrupted run's (the shared fixture: the same config and
  # inputs through every stage in one go)
  want = _restore(cfg, tiny_trained).params
  got_state = _restore(cfg, wd)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got_state.params)):
    np.testing.assert_array_equal(a, b)
  assert json.load(open(os.path.join(wd, 'eval',
                                     'summary.json')))['checkpoint_step'] == cfg.train.steps


def _restore(cfg, wd, step=None):
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  tx, _ = train_state.make_optimizer(cfg.train)
  ckpt = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'), cfg.train.keep_checkpoints)
  state, _, _ = ckpt.restore(train_state.abstract_state(cfg, distributed.mesh(), 4, tx), step)
  ckpt.close()
  return jax.device_get(state)


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tiny_workdir, tmp_path, caplog):
  cfg = tiny_config()
  wd = str(tmp_path / 'wd')
  copy_inputs(tiny_workdir, wd)
  train.train_and_evaluate(cfg, wd)
  ckpt_dir = os.path.join(wd, 'checkpoints')
  assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [3, 6]
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ckpt_dir, '6', 'state'))
                 for f in fs), key=os.path.getsize)
  with open(biggest, 'r+b') as f:  # truncate the largest array file of the newest step
    f.truncate(os.path.getsize(biggest) // 3)
  caplog.set_level('WARNING')
  state = _restore(cfg, wd)
  assert int(state.step) == 3
  assert any(
      'restored step 3 instead of the newest step 6' in r.getMessage() for r in caplog.records)
  want = _restore(cfg, wd, step=3)
  for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_second_run_refuses_and_a_stale_lock_is_cleared(tiny_workdir, tmp_path):
  wd = str(tmp_path / 'wd')
  copy_inputs(tiny_workdir, wd)
  cfg = tiny_config()
  with workdir_lib.WorkdirLock(wd, 'train'):  # a live run: this process
    r = _main(wd, '--mode=pseudo_labels')
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    want = f'in use by another run (host {os.uname().nodename}, pid {os.getpid()}, mode train'
    assert want in r.stderr
  assert not os.path.exists(os.path.join(wd, '.lock'))  # released on exit
  # predict and evaluate may read a workdir whose training is still running; nothing else may
  assert workdir_lib.can_share('predict', 'train') and workdir_lib.can_share('evaluate', 'train')
  assert workdir_lib.can_share('predict', 'all') and not workdir_lib.can_share('evaluate', 'all')
  assert not workdir_lib.can_share('train', 'train') and not workdir_lib.can_share('all', 'predict')
  assert not workdir_lib.can_share('predict', 'predict')
  dead = subprocess.Popen(['true'])
  dead.wait()
  with open(os.path.join(wd, '.lock'), 'w') as f:  # left by a killed run on this host
    json.dump({'host': os.uname().nodename, 'pid': dead.pid, 'mode': 'train', 'started': '-'}, f)
  pipeline.run(cfg, wd, 'pseudo_labels')  # clears it, runs, releases
  assert not os.path.exists(os.path.join(wd, '.lock'))
  with open(os.path.join(wd, '.lock'), 'w') as f:  # another host: cannot be checked, refused
    json.dump({'host': 'node-17', 'pid': 1, 'mode': 'all', 'started': '-'}, f)
  with pytest.raises(pipeline.WorkdirError, match=r'host node-17, pid 1, .* delete .*\.lock'):
    pipeline.run(cfg, wd, 'pseudo_labels')


def _no_writes():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # every write fails: a full disk


def test_unwritable_or_full_workdir_fails_before_any_work(tmp_path):
  full = str(tmp_path / 'full')
  r = _main(full, '--mode=prepare', preexec=_no_writes)
  assert r.returncode == 2 and 'workdir is not writable (File too large)' in r.stderr, r.stderr[
      -2000:]
  assert os.listdir(full) == []  # the probe was removed, nothing else written
  r = _main(full, '--mode=prepare', '--config.workdir.min_free_gb=1e9')
  assert r.returncode == 2 and 'GB free, below workdir.min_free_gb = 1e+09' in r.stderr
  assert os.listdir(full) == []


def test_read_only_workdir_fails_before_any_work(tmp_path):
  ro = tmp_path / 'ro'
  ro.mkdir()
  os.chmod(ro, 0o555)  # read-only for a normal user; root ignores modes: make it immutable too
  immutable = False
  if os.getuid() == 0:
    immutable = shutil.which('chattr') and subprocess.run(
        ['chattr', '+i', str(ro)], capture_output=True).returncode == 0
    if not immutable:
      pytest.skip('running as root where chattr +i does not work: no way to make a folder '
                  'read-only for this user')
  try:
    r = _main(str(ro), '--mode=prepare')
  finally:
    if immutable:
      subprocess.run(['chattr', '-i', str(ro)], check=True)
    os.chmod(ro, 0o755)
  assert r.returncode == 2 and 'workdir is not writable (' in r.stderr, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr and os.listdir(ro) == []


def test_evaluating_missing_or_misshapen_predictions_lists_every_case(tiny_workdir, tmp_path):
  cfg = tiny_config()
  wd = str(tmp_path / 'wd')
  copy_inputs(tiny_workdir, wd)
  preds = tmp_path / 'preds'
  shutil.copytree(os.path.join(tiny_workdir, 'pseudo_labels', 'nifti'), preds)
  cfg.eval.predictions_dir = str(preds)
  summary = evaluate.evaluate(cfg, wd)  # P's own masks score exactly as P
  p_row = json.load(open(os.path.join(wd, 'pseudo_labels', 'summary.json')))['summary']
  assert abs(summary[f'predictions ({preds})']['dice']['mean'] - p_row['dice']['mean']) < 1e-9
  os.remove(preds / 'phantom_mri_000.nii.gz')
  img = nib.load(str(preds / 'phantom_mri_002.nii.gz'))
  nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine),
           str(preds / 'phantom_mri_002.nii.gz'))
  shutil.rmtree(os.path.join(wd, 'eval_predictions'))
  with pytest.raises(prepare.StageError) as e:
    evaluate.evaluate(cfg, wd)
  msg = str(e.value)
  assert 'missing (1): phantom_mri_000' in msg and 'phantom_mri_002: shape' in msg
  assert 'phantom_mri_001' not in msg and not os.path.exists(os.path.join(wd, 'eval_predictions'))
  img = nib.load(str(preds / 'phantom_mri_001.nii.gz'))  # a float mask with a NaN: refused too
  bad = np.asarray(img.dataobj).astype(np.float32)
  bad[0, 0, 0] = np.nan
  nib.save(nib.Nifti1Image(bad, img.affine), str(preds / 'phantom_mri_001.nii.gz'))
  with pytest.raises(prepare.StageError,
                     match=r'phantom_mri_001: .*phantom_mri_001\.nii\.gz has NaN'):
    evaluate.evaluate(cfg, wd)
