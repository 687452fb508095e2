"""Runs the stages in order on one workdir; each stage skips what is already done and current.

JAX, orbax and the model are imported only by the stages that need them: offline-stage worker
processes (spawned) re-import the main module, and should not pay for JAX.
"""
import contextlib
import json
import logging as std_logging
import os
import sys
import time

from absl import logging

from cgc_jax import errors
from cgc_jax.core import config_rules
from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.core import workdir as workdir_lib
from cgc_jax.imaging import readers
from cgc_jax.runtime import workers
from cgc_jax.stages import prepare

MODES = ('all', 'verify', 'prepare', 'pseudo_labels', 'train', 'evaluate', 'predict', 'export')


WorkdirError = errors.WorkdirError  # defined in errors.py (every user-facing error in one place)


USER_ERRORS = errors.USER_ERRORS


def _quiet(record) -> bool:
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs():
  """Drops orbax's per-save INFO lines (dozens per checkpoint); its warnings and errors stay."""
  logging.get_absl_handler().addFilter(_quiet)


def cli(fn, verbose: bool):
  """Runs fn() for a command-line entry point: quiet library logs, and a user error (bad data, a
  stage failure, an unusable workdir) as one paragraph on stderr and exit 2 (traceback:
  --verbose)."""
  if not verbose:
    quiet_library_logs()
  try:
    return fn()
  except USER_ERRORS as e:
    if verbose:
      raise
    logging.error('%s', e)
    print(f'cgc_jax: error: {e}', file=sys.stderr)
    sys.exit(2)


def resolve_config(argv: list) -> list:
  """`--config=NAME` (no such file) -> the packaged configs/NAME.py; anything else unchanged.

  A `:variant` suffix is kept (ml_collections passes it to get_config)."""
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')  # installed package
  repo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  out = []
  for a in argv:
    if a.startswith('--config=') and '.' not in a[len('--config='):].split(':')[0].split('/')[-1]:
      name, _, variant = a[len('--config='):].partition(':')
      for d in (here, repo):
        path = os.path.join(d, f'{name}.py')
        if not os.path.exists(name) and os.path.exists(path):
          a = f'--config={path}' + (f':{variant}' if variant else '')
          break
    out.append(a)
  return out


def workdir_config(workdir: str):
  """The config a workdir's last run recorded (WORKDIR/config.json), as a ConfigDict."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise errors.StageError(f'{path}: missing: not a cgc_jax workdir, or trained before runs '
                            'recorded their config; pass --config=the training config')
  import ml_collections  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def export_model(config, workdir: str, output: str) -> dict:
  """--mode=export: the workdir's networks (as evaluate restores them) and config in one model
  package (inference.package) at `output`. Reads the workdir, writes nothing in it."""
  from cgc_jax.inference import package  # pylint: disable=g-import-not-at-top
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  config_rules.check(config)
  distributed.initialize(config.dist)
  return package.export(config, workdir, output, distributed.mesh())


def package_config(path: str):
  """The config inside a model package, set to predict with that package's networks
  (eval.package)."""
  from cgc_jax.inference import package  # pylint: disable=g-import-not-at-top
  config = package.read(path)[0]
  config.eval.package = os.path.abspath(path)
  return config


def with_predict_paths(config, input_path=None, output_dir=None, probabilities=False):
  """A copy of `config` reading new scans from `input_path` and writing masks (and with
  `probabilities`, probability maps) to `output_dir`."""
  c = config.copy_and_resolve_references()
  if probabilities:
    c.eval.save_probabilities = True
  if input_path:
    c.eval.input_root = os.path.abspath(input_path)
  if output_dir:
    c.eval.output_dir = os.path.abspath(output_dir)
  return c


def run(config, workdir: str, mode: str = 'all'):
  t0 = time.time()
  config_rules.check(config)  # a mistyped field stops here, before anything is written
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config.dist)  # first: every stage below may be split across processes
  if mode == 'verify':  # writes nothing, not even the workdir
    prepare.verify(config, workdir)
    return
  workdir_lib.check_writable(workdir, config.workdir.min_free_gb)
  with claimed(config, workdir, mode) as owner:
    # a run sharing another's workdir (predict beside training) leaves that run's config.json alone
    log_handler = _record_run(config, workdir, owner) if distributed.is_main() else None
    try:
      _run_stages(config, workdir, mode, t0)
    finally:
      if log_handler:
        std_logging.getLogger().removeHandler(log_handler)
        log_handler.close()


@contextlib.contextmanager
def claimed(config, workdir: str, mode: str):
  """Holds the workdir for this run (process 0 takes WORKDIR/.lock; every process learns the
  outcome at once) and yields whether this run owns it: False for a run that only shares it
  (workdir.can_share: predict or evaluate beside training) or when workdir.lock is off. Raises
  WorkdirError when another run holds it; the lock is released on the way out, whatever
  happened."""
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  lock, err = None, ''
  if distributed.is_main() and config.workdir.lock:
    try:
      lock = workdir_lib.WorkdirLock(workdir, mode).acquire()
    except WorkdirError as e:
      err = str(e)
      holder = workdir_lib.WorkdirLock(workdir, mode).holder() or {}
      if workdir_lib.can_share(mode, holder.get('mode', '')):
        logging.warning('%s: another run (pid %s, mode %s) holds the workdir: --mode=%s reads its '
                        'finished checkpoints and writes only %s/', workdir, holder.get('pid'),
                        holder.get('mode'), mode, workdir_lib.SHARED_OUTPUT[mode])
        err = ''
  distributed.sync('workdir-lock', err, config.dist.barrier_timeout_s)
  if err:
    raise WorkdirError(err)
  try:
    yield lock is not None or not config.workdir.lock
  finally:
    if lock:
      lock.release()


def _record_run(config, workdir: str, write_config: bool = True):
  """WORKDIR/config.json (the resolved config of the latest run that held the workdir) and
  WORKDIR/log.txt (every log line, appended: the terminal's record survives the terminal). Returns
  the log file handler."""
  if write_config:
    store_lib.atomic_write_json(os.path.join(workdir, 'config.json'),
                                json.loads(config.to_json_best_effort()))
  handler = std_logging.FileHandler(os.path.join(workdir, 'log.txt'))
  handler.setFormatter(std_logging.Formatter('%(asctime)s %(levelname)s %(module)s: %(message)s'))
  handler.setLevel(std_logging.INFO)
  handler.addFilter(_quiet)
  std_logging.getLogger().addHandler(handler)
  return handler


def _run_stages(config, workdir, mode, t0):
  if mode in ('all', 'prepare'):
    prepare.run(config, workdir)
  if mode in ('all', 'pseudo_labels'):
    from cgc_jax.stages import pseudo_labels  # pylint: disable=g-import-not-at-top
    pseudo_labels.run(config, workdir)
  if mode in ('all', 'train'):
    from cgc_jax.stages import train  # pylint: disable=g-import-not-at-top
    try:
      periodic = None
      if config.eval.every_steps:
        from cgc_jax.inference import tracking  # pylint: disable=g-import-not-at-top
        from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
        periodic = tracking.track_during_training(config, workdir, distributed.mesh())
      train.train_and_evaluate(config, workdir, periodic)
    except train.Preempted as e:
      logging.warning('%s', e)
      return
  if mode == 'evaluate':  # label files added, edited or removed since: scored, nothing redone
    prepare.update_references(config, workdir)
  if mode in ('all', 'evaluate'):
    from cgc_jax.stages import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir)
  if mode == 'predict':
    _predict(config, workdir)
  logging.info('%s done in %.1fs (workdir %s)', mode, time.time() - t0, workdir)


def _predict(config, workdir: str):
  """--mode=predict: prepares the new scans of eval.input_root apart from the training data
  (WORKDIR/predict/prepared/), then writes a mask per readable scan; unreadable scans are listed
  in one error after the good ones are written."""
  if not config.eval.input_root:
    raise errors.StageError(
        '--mode=predict needs the new scans: --input=PATH (a NIfTI file, a case '
        'folder or a folder of cases; or --config.eval.input_root=PATH)')
  from cgc_jax.stages import predict  # pylint: disable=g-import-not-at-top
  store = paths.predict_store(config, workdir)
  failed = None
  try:
    cases = prepare.run(config, workdir, root=config.eval.input_root, store=store)
  except errors.StageError as e:  # bad scans: predict the good ones, then report the bad ones
    failed, cases = e, e.done
  predict.predict(config, workdir, store, cases)
  if failed:
    raise errors.StageError(f'{failed}\npredict: masks were written for the {len(cases)} readable '
                            'scans only', cases)
