"""One run per workdir: the checks before any work (writable, room to write) and WORKDIR/.lock,
which modes may share a workdir with the run holding it. No JAX: cgc_jax.pipeline.claimed adds the
agreement of every process."""
import json
import os
import shutil
import socket
import time

from absl import logging

from cgc_jax import errors

WorkdirError = errors.WorkdirError


def check_writable(workdir: str, min_free_gb: float):
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

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock (clearing a stale one) or raises WorkdirError naming the holder."""
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        other = self.holder()
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

  def holder(self):
    """The lock's {host, pid, mode, started}, or None when there is none or it is unreadable."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def release(self):
    """Removes the lock if this process holds it."""
    if (self.holder() or {}).get('pid') == self.info['pid']:
      os.remove(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *_):
    self.release()


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
