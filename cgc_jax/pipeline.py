"""Runs the stages in order on one workdir; each stage skips what is already done and current.

JAX, orbax and the model are imported only by the stages that need them: offline-stage worker
processes (spawned) re-import the main module, and should not pay for JAX.
"""
import os
import time

from absl import logging

from cgc_jax import errors
from cgc_jax import parallel
from cgc_jax import prepare
from cgc_jax import readers
from cgc_jax import store as store_lib

MODES = ('all', 'verify', 'prepare', 'pseudo_labels', 'train', 'evaluate', 'predict')


class WorkdirError(Exception):
  """The workdir cannot be used (read-only, full, locked by another run)."""


USER_ERRORS = (readers.DataError, prepare.StageError, parallel.CaseFailure, WorkdirError,
               store_lib.CorruptShardError, errors.IncompatibleCheckpointError,
               errors.DistributedError)


def _check_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
    with open(probe, 'wb') as f:
      f.write(b'\0' * 4096)
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'{workdir}: workdir is not writable ({e.strerror}); nothing was done') from e


def run(config, workdir: str, mode: str = 'all'):
  t0 = time.time()
  from cgc_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config.dist)  # first: every stage below may be split across processes
  if mode == 'verify':  # writes nothing, not even the workdir
    prepare.verify(config, workdir)
    return
  _check_workdir(workdir)
  if mode in ('all', 'prepare'):
    prepare.run(config, workdir)
  if mode in ('all', 'pseudo_labels'):
    from cgc_jax import pseudo_labels  # pylint: disable=g-import-not-at-top
    pseudo_labels.run(config, workdir)
  if mode in ('all', 'train'):
    from cgc_jax import train  # pylint: disable=g-import-not-at-top
    try:
      periodic = None
      if config.eval.every_steps:
        from cgc_jax import evaluate  # pylint: disable=g-import-not-at-top
        periodic = evaluate.dice_during_training(config, workdir, distributed.mesh())
      train.train_and_evaluate(config, workdir, periodic)
    except train.Preempted as e:
      logging.warning('%s', e)
      return
  if mode in ('all', 'evaluate'):
    from cgc_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir)
  if mode == 'predict':
    from cgc_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.predict(config, workdir)
  logging.info('%s done in %.1fs (workdir %s)', mode, time.time() - t0, workdir)
