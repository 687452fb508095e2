"""Multi-process runs on one machine (launch/local.sh): the same numbers as one process.

Each run is a real multi-controller JAX job: processes joined by a localhost coordinator, gloo
collectives between them, orbax saves from every process, offline stages split across processes.
"""
import json
import os
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from cgc_jax.core import paths
from cgc_jax.runtime import distributed
from cgc_jax.stages import evaluate
from cgc_jax.training import input_pipeline

from conftest import ROOT
from conftest import copy_inputs
from conftest import tiny_config

pytestmark = pytest.mark.slow  # real subprocesses: the whole file
# Multi-process jobs wait on each other in their collectives: two of them at once on a small
# machine (two pytest-xdist workers) each spin while the other computes. One worker runs them all.
_PROCESSES = pytest.mark.xdist_group('processes')

LAUNCH = os.path.join(ROOT, 'launch', 'local.sh')
TINY = os.path.join(ROOT, 'tests', 'tiny.py')


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # not this process's 8 devices
  # the launcher starts ${PYTHON:-python}: this interpreter, so an unactivated venv works
  env.update(JAX_PLATFORMS='cpu', PYTHON=sys.executable, **extra)
  return env


def _launch(n, devices, wd, *args):
  r = subprocess.run(['bash', LAUNCH, str(n), str(devices), f'--config={TINY}', f'--workdir={wd}',
                      *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return r.stderr


def _metrics(wd):
  with open(os.path.join(wd, 'train', 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _masks(wd):
  d = os.path.join(wd, 'eval', 'predictions')
  return {f: np.asarray(nib.load(os.path.join(d, f)).dataobj) for f in sorted(os.listdir(d))
          if f.endswith('.nii.gz')}


@_PROCESSES
def test_two_processes_equal_one_and_checkpoints_cross_topologies(tiny_workdir, tmp_path):
  a, b = str(tmp_path / 'a_2x2'), str(tmp_path / 'b_1x4')
  # a: 2 processes x 2 devices, every stage from scratch (phantoms by process 0, cases split)
  log = _launch(2, 2, a)
  assert '[p0]' in log and '[p1]' in log and 'to do (2 in this process)' in log and \
      'to do (1 in this process)' in log
  cfg = tiny_config()
  ref, got = paths.pl_store(cfg, tiny_workdir), paths.pl_store(cfg, a)
  assert got.complete_cases() == ref.complete_cases()
  for c in ref.complete_cases():  # the split offline stages wrote what one process writes
    np.testing.assert_array_equal(got.read(c, 'p'), ref.read(c, 'p'))
  # b: 1 process x 4 devices on the same inputs, training only
  copy_inputs(tiny_workdir, b)
  _launch(1, 4, b, '--mode=train')
  ma, mb = _metrics(a), _metrics(b)
  assert [r['step'] for r in ma] == [r['step'] for r in mb] == list(range(1, cfg.train.steps + 1))
  for ra, rb in zip(ma, mb):
    for k in ('loss', 'seg', 'coarse', 'fine', 'grad_norm'):
      np.testing.assert_allclose(ra[k],
                                 rb[k],
                                 rtol=1e-5,
                                 atol=1e-5,
                                 err_msg=f'step {ra["step"]} {k}')
  masks_a = _masks(a)
  assert len(masks_a) == 3 and any(m.sum() for m in masks_a.values())
  # the 2-process checkpoint restored by one process (this one, 8 devices): the same masks
  os.rename(os.path.join(a, 'eval'), os.path.join(a, 'eval_2x2'))
  evaluate.evaluate(cfg, a)
  got = _masks(a)
  assert set(got) == set(masks_a)
  for f, m in got.items():
    np.testing.assert_array_equal(m, masks_a[f], err_msg=f)
  # and the reverse: the 1-process checkpoint evaluated by one process (this one) and by 2
  evaluate.evaluate(cfg, b)
  masks_b = _masks(b)
  assert len(masks_b) == 3 and any(m.sum() for m in masks_b.values())
  os.rename(os.path.join(b, 'eval'), os.path.join(b, 'eval_1'))
  _launch(2, 2, b, '--mode=evaluate')
  got = _masks(b)
  assert set(got) == set(masks_b)
  for f, m in got.items():
    np.testing.assert_array_equal(m, masks_b[f], err_msg=f)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(i, n, port, args, log_path):
  env = _env(XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(n),
             JAX_PROCESS_ID=str(i))
  with open(log_path, 'w') as log:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=log)


@_PROCESSES
def test_a_dead_process_stops_the_others_within_the_heartbeat_timeout(tiny_workdir, tmp_path):
  wd = str(tmp_path / 'dead')
  copy_inputs(tiny_workdir, wd)
  port, timeout_s = _free_port(), 5
  args = ['-m', 'cgc_jax.main', f'--config={TINY}', f'--workdir={wd}', '--mode=train',
          '--config.train.steps=100000', f'--config.dist.heartbeat_timeout_s={timeout_s}']
  procs = [_start(i, 2, port, args, str(tmp_path / f'p{i}.log')) for i in range(2)]
  try:
    metrics = os.path.join(wd, 'train', 'metrics.jsonl')
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
      assert time.time() < deadline and procs[0].poll() is None, open(tmp_path / 'p0.log').read()
      time.sleep(0.2)
    procs[1].kill()  # process 1 dies mid-training (kill -9)
    t0 = time.time()
    rc = procs[0].wait(timeout=120)
    waited = time.time() - t0
  finally:
    for p in procs:
      p.kill()
  assert rc != 0
  assert waited < timeout_s + 30, waited  # not hanging in a collective


_CROPS_SCRIPT = '''
import sys
import numpy as np
from cgc_jax.runtime import distributed
distributed.initialize()
import jax
from cgc_jax.core import paths
from cgc_jax.training import device_crops, input_pipeline
sys.path.insert(0, sys.argv[2])
import tiny
c = tiny.get_config()
prep, pl = paths.prepared_store(c, sys.argv[1]), paths.pl_store(c, sys.argv[1])
sampler = lambda i, n: input_pipeline.CropSampler(prep, pl, pl.complete_cases(), c.train, True,
                                                  i, n)
mine = sampler(jax.process_index(), 2)
class Gpu:  # process 1's GPUs too small for the cases: 'auto' must cut on the host in both
  platform = 'gpu'
  def memory_stats(self):
    return {'bytes_limit': 10 ** 12 if jax.process_index() == 0 else 1}
assert c.train.crops_on == 'auto'
print('CHOICE', jax.process_index(), device_crops.choose(mine, [Gpu()]), flush=True)
dev = device_crops.DeviceCrops(mine, distributed.mesh())
for step in (3, 4):
  got, want = dev.batch(step), sampler(0, 1).local_batch(step)
  for k, w in want.items():
    g = distributed.gather(got[k])
    tol = 1e-6 if k == 'image' else 0.0
    ok = g.shape == w.shape and np.allclose(g, w, rtol=2 * tol, atol=tol)
    print('CROPS', jax.process_index(), jax.device_count(), step, k, 'ok' if ok else 'MISMATCH',
          flush=True)
'''


@_PROCESSES
def test_two_processes_cut_the_one_process_batch_on_their_devices(tiny_workdir, tmp_path):
  """train.crops_on = device in a 2-process job: each process holds every case on its 2
  devices and draws only its slots; the global batch is the one-process host batch. Under 'auto'
  the processes agree: one that must cut on the host makes the other cut there too."""
  port = _free_port()
  args = ['-c', _CROPS_SCRIPT, tiny_workdir, os.path.join(ROOT, 'tests')]
  procs = [_start(i, 2, port, args, str(tmp_path / f'c{i}.log')) for i in range(2)]
  try:
    rcs = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  logs = [open(tmp_path / f'c{i}.log').read() for i in range(2)]
  assert rcs == [0, 0], logs
  for i, log in enumerate(logs):
    lines = [line.split() for line in log.splitlines() if line.startswith('CROPS')]
    keys = input_pipeline.batch_keys(tiny_config().train)
    assert sorted((x[3], x[4]) for x in lines) == sorted((s, k) for s in '34' for k in keys), log
    assert all(x[1] == str(i) and x[2] == '4' and x[5] == 'ok' for x in lines), log
    # the processes agree on where to cut: process 1's 'auto' says host, so process 0's does too
    want = ("CHOICE 0 (False, 'auto: processes [1] cut on the host')" if i == 0 else
            "CHOICE 1 (False, 'auto: the cases need")
    assert want in log, log


_SYNC_SCRIPT = '''
import sys, time
from cgc_jax.runtime import distributed
distributed.initialize()
pid = distributed.jax.process_index()
try:
  distributed.sync('stage', 'case_7: unreadable header' if pid == 1 else '', 60)
except distributed.DistributedError as e:
  print('FAILED', e, flush=True)
if pid == 1:
  time.sleep(6)  # alive but late
try:
  distributed.sync('late', '', 3)
except distributed.DistributedError as e:
  print('TIMEOUT', e, flush=True)
'''


@_PROCESSES
def test_barrier_carries_failures_and_names_missing_processes(tmp_path):
  port = _free_port()
  procs = [_start(i, 2, port, ['-c', _SYNC_SCRIPT], str(tmp_path / f's{i}.log')) for i in range(2)]
  try:
    assert procs[0].wait(timeout=120) == 0, open(tmp_path / 's0.log').read()
  finally:
    for p in procs:
      p.kill()
  out = open(tmp_path / 's0.log').read()
  assert 'FAILED stage: failed in process(es) [1]:\n[process 1] case_7: unreadable header' in out
  assert 'TIMEOUT late: processes [1] of 2 did not reach the barrier within 3s' in out


def test_launch_scripts_fail_fast_naming_what_is_missing():
  env = {k: v for k, v in _env().items() if not k.startswith(('SLURM_', 'TPU_'))}
  env.pop('ZONE', None)
  cases = [(['local.sh', '2'], 'usage: '),
           (['local.sh', 'two', '2', '--config=c',
             '--workdir=w'], 'NUM_PROCESSES must be a positive'),
           (['slurm.sbatch', '--config=c', '--workdir=w'], 'not inside a SLURM job'),
           (['tpu_pod.sh', '--config=c', '--workdir=w'], 'TPU_NAME')]
  for args, message in cases:
    r = subprocess.run(['bash', os.path.join(ROOT, 'launch', args[0]), *args[1:]], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and message in r.stderr, (args, r.returncode, r.stderr)


def test_a_wrong_device_count_stops_at_start_up():
  cfg = tiny_config()
  cfg.dist.expected_devices = 16
  with pytest.raises(distributed.DistributedError, match=r'expected 16 devices .*found 8'):
    distributed.initialize(cfg.dist)
  cfg.dist.expected_devices = 8
  distributed.initialize(cfg.dist)


def test_barrier_keys_count_per_name_and_reset():
  distributed.reset_barriers()
  keys = [distributed.barrier_key('a') for _ in range(2)]
  assert keys == ['cgc_jax/sync/a/0/', 'cgc_jax/sync/a/1/']
  assert distributed.barrier_key('b') == 'cgc_jax/sync/b/0/'
  distributed.reset_barriers()
  assert distributed.barrier_key('a') == 'cgc_jax/sync/a/0/'
  distributed.reset_barriers()
