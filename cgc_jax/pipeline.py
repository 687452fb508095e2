"""Runs the stages in order on one workdir; each stage skips what is already done and current.

JAX, orbax and the model are imported only by the stages that need them: offline-stage worker
processes (spawned) re-import the main module, and should not pay for JAX.
"""
import json
import logging as std_logging
import os
import shutil
import socket
import sys
import time

from absl import logging

from cgc_jax import errors
from cgc_jax.core import config_rules
from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import readers
from cgc_jax.runtime import workers
from cgc_jax.stages import prepare

MODES = ('all', 'verify', 'prepare', 'pseudo_labels', 'train', 'evaluate', 'predict')


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


def _check_workdir(workdir: str, min_free_gb: float):
  """Before any work: the workdir can be created and written, and has room."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
    try:
      with open(probe, 'wb') as f:
        f.write(b'\0' * 4096)
    finally:
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    raise WorkdirError(
        f'{workdir}: workdir is not writable ({e.strerror}); nothing was done') from e
  free_gb = shutil.disk_usage(workdir).free / 1e9
  if free_gb < min_free_gb:
    raise WorkdirError(
        f'{workdir}: only {free_gb:.2f} GB free, below workdir.min_free_gb = '
        f'{min_free_gb:g}; free some space or use another --workdir; nothing was done')


class WorkdirLock:
  """WORKDIR/.lock holds {host, pid, mode, started} of the run using the workdir.

  A second run refuses with the first one's host and pid. A lock left by a killed run on this host
  (its pid no longer running) is stale: cleared with a warning. A lock from another host cannot be
  checked from here: the message says how to clear it by hand.
  """

  def __init__(self, workdir: str, mode: str):
    self.path = os.path.join(workdir, '.lock')
    self.info = {'host': socket.gethostname(), 'pid': os.getpid(), 'mode': mode,
                 'started': time.strftime('%Y-%m-%d %H:%M:%S')}

  def __enter__(self):
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        other = self._read()
        if other is None or (other.get('host') == self.info['host'] and
                             not _running(other.get('pid', -1))):
          logging.warning('%s: clearing a stale lock %s (that run is no longer running)', self.path,
                          other or '(unreadable)')
          try:
            os.remove(self.path)
          except FileNotFoundError:
            pass
          continue
        raise WorkdirError(
            f'{os.path.dirname(self.path)}: in use by another run (host {other.get("host")}, pid '
            f'{other.get("pid")}, mode {other.get("mode")}, started {other.get("started")}). Wait '
            f'for it to finish or stop it; if it died on another host, delete {self.path}.')
      with os.fdopen(fd, 'w') as f:
        json.dump(self.info, f)
      return self
    raise WorkdirError(f'{self.path}: could not take the workdir lock')

  def _read(self):
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def __exit__(self, *_):
    if (self._read() or {}).get('pid') == self.info['pid']:
      os.remove(self.path)


# Modes that may run beside a run holding the workdir lock, the holder modes they may share it with
# (whose outputs they only read), and the one folder they write.
_SHAREABLE = {'predict': ('train', 'all', 'evaluate'), 'evaluate': ('train',)}
SHARED_OUTPUT = {'predict': 'predict', 'evaluate': 'eval'}


def can_share(mode: str, holder_mode: str) -> bool:
  """Whether --mode=`mode` may use a workdir while a run in `holder_mode` holds it: predict writes
  only WORKDIR/predict/, evaluate only WORKDIR/eval/ (so not beside an `all` run, which ends with
  its own evaluation); both read checkpoints, which orbax publishes complete or not at all."""
  return holder_mode in _SHAREABLE.get(mode, ())


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def run(config, workdir: str, mode: str = 'all'):
  t0 = time.time()
  config_rules.check(config)  # a mistyped field stops here, before anything is written
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config.dist)  # first: every stage below may be split across processes
  if mode == 'verify':  # writes nothing, not even the workdir
    prepare.verify(config, workdir)
    return
  _check_workdir(workdir, config.workdir.min_free_gb)
  lock = WorkdirLock(workdir, mode) if distributed.is_main() and config.workdir.lock else None
  err = ''
  if lock:
    try:
      lock.__enter__()
    except WorkdirError as e:
      err, lock = str(e), None
      holder = WorkdirLock(workdir, mode)._read() or {}  # pylint: disable=protected-access
      if can_share(mode, holder.get('mode', '')):
        logging.warning('%s: another run (pid %s, mode %s) holds the workdir: --mode=%s reads its '
                        'finished checkpoints and writes only %s/', workdir, holder.get('pid'),
                        holder.get('mode'), mode, SHARED_OUTPUT[mode])
        err = ''
  # every process learns at once whether process 0 got the workdir (not after a heartbeat timeout)
  distributed.sync('workdir-lock', err, config.dist.barrier_timeout_s)
  if err:
    raise WorkdirError(err)
  # a run sharing another's workdir (predict beside training) leaves that run's config.json alone
  owner = lock is not None or not config.workdir.lock
  log_handler = _record_run(config, workdir, owner) if distributed.is_main() else None
  try:
    _run_stages(config, workdir, mode, t0)
  finally:
    if log_handler:
      std_logging.getLogger().removeHandler(log_handler)
      log_handler.close()
    if lock:
      lock.__exit__()


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
