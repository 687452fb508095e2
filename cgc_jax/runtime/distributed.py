"""Process start-up, the device mesh, host-local data -> global jax.Array, and cross-process sync.

One function owns start-up (`initialize`); one helper turns each process's NumPy slice into the
global batch (`global_batch`), naming the array that failed; `sync` is the offline stages' barrier
(with a timeout that names the missing processes); `gather` brings a global array back to every
host.

Multi-process jobs use JAX's multi-controller runtime: every process runs the same program, owns its
local devices, and the coordination service (started by process 0) carries heartbeats: if a process
dies, the others are terminated (non-zero exit) after `dist.heartbeat_timeout_s` instead of hanging
in a collective. Files are written to a workdir that every process sees (a shared file system, as
orbax requires for checkpoints).
"""
import os
import time

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cgc_jax import errors

_INITIALIZED = False
_SYNC_COUNT = {}


DistributedError = errors.DistributedError


def _setting(value, env: str, unset):
  if value != unset:
    return value
  return os.environ.get(env, unset) if isinstance(unset, str) else int(os.environ.get(env, unset))


def _detected_cluster() -> str:
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return 'slurm'
  if len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return 'cloud_tpu'
  return ''


def initialize(dist_cfg=None):
  """Starts the multi-process runtime when the job is multi-process; logs the layout; checks it.

  Multi-process when a coordinator address is given (config.dist.* or JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID), or under SLURM with more than one task, or on a GKE TPU slice
  (TPU_WORKER_HOSTNAMES), or with dist.auto_detect (Cloud TPU VM pods): then
  jax.distributed.initialize() detects the rest.
  Idempotent: the stages call it; the first call decides.
  """
  global _INITIALIZED
  d = dist_cfg
  # pylint: disable-next=unnecessary-lambda-assignment
  get = lambda k, default: d[k] if d is not None and k in d else default
  if not _INITIALIZED:
    coord = _setting(get('coordinator_address', ''), 'JAX_COORDINATOR_ADDRESS', '')
    cluster = 'auto-detect' if get('auto_detect', False) else _detected_cluster()
    timeouts = dict(initialization_timeout=int(get('init_timeout_s', 300)),
                    heartbeat_timeout_seconds=int(get('heartbeat_timeout_s', 100)))
    if coord:
      num = _setting(get('num_processes', 0), 'JAX_NUM_PROCESSES', 0)
      pid = _setting(get('process_id', -1), 'JAX_PROCESS_ID', -1)
      if num < 1 or not 0 <= pid < num:
        raise DistributedError(
            f'coordinator {coord} given, but the process count ({num}) and id ({pid}) are not '
            'valid: set --config.dist.num_processes and --config.dist.process_id (or '
            'JAX_NUM_PROCESSES and JAX_PROCESS_ID)')
      jax.distributed.initialize(coordinator_address=coord, num_processes=num, process_id=pid,
                                 **timeouts)
    elif cluster:
      logging.info('multi-process job detected (%s)', cluster)
      jax.distributed.initialize(**timeouts)
    _INITIALIZED = True
    logging.info('JAX: process %d of %d, %d local / %d global devices (%s: %s)',
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform, jax.devices()[0].device_kind)
  expected = int(get('expected_devices', 0))
  if expected and jax.device_count() != expected:
    raise DistributedError(
        f'expected {expected} devices (dist.expected_devices), found {jax.device_count()} over '
        f'{jax.process_count()} processes ({jax.local_device_count()} here). Under SLURM, give '
        'each process all its node\'s GPUs (--gpus-per-task) or run one process per GPU, '
        'deliberately.')


def mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ('data',))


class OnMesh:
  """A jitted function traced, lowered and run with `mesh` as JAX's context mesh (jax.set_mesh),
  so that code inside it can split its work along the mesh: the oneDNN convolution runs per device
  on its own rows of the batch (model.unet.conv3x3x3). Calls, .lower and any other attribute go to
  the jitted function."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.jitted, name)


def data_sharding(m: Mesh) -> NamedSharding:
  return NamedSharding(m, P('data'))


def replicated(m: Mesh) -> NamedSharding:
  return NamedSharding(m, P())


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """{name: np[B_local, ...]} of this process -> {name: jax.Array[B_global, ...]} sharded on
  batch."""
  out = {}
  for k, v in local.items():
    try:
      out[k] = jax.make_array_from_process_local_data(sharding, v)
    except Exception as e:
      raise ValueError(f'global batch: array {k!r} with local shape {np.shape(v)} (process '
                       f'{jax.process_index()}) could not be assembled on {sharding}: {e}') from e
  return out


def gather(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) sharded jax.Array -> the whole array as NumPy on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_main() -> bool:
  return jax.process_index() == 0


def share(items: list) -> list:
  """This process's share of `items` (round robin, so each process gets a similar amount)."""
  return list(items)[jax.process_index()::jax.process_count()]


def barrier_key(name: str) -> str:
  """The key-value prefix of the next barrier called `name`: 'cgc_jax/sync/<name>/<k>/', k counting
  this process's earlier barriers of that name (every process makes the same calls in order)."""
  k = _SYNC_COUNT.get(name, 0)
  _SYNC_COUNT[name] = k + 1
  return f'cgc_jax/sync/{name}/{k}/'


def reset_barriers():
  """Numbers every barrier name from 0 again: for a new set of processes (a new coordination
  service), e.g. several runs in one Python process."""
  _SYNC_COUNT.clear()


def sync(name: str, error: str = '', timeout_s: float = 3600.0):
  """Barrier for the offline stages: every process posts its outcome under `name` and waits for all.

  `error` is this process's failure message ('' = fine). Raises DistributedError naming the
  processes that did not arrive within `timeout_s`, or carrying every failed process's message, so
  that all processes stop together with the same explanation. Calls with the same name are numbered
  (every process makes the same calls in the same order).
  """
  n = jax.process_count()
  if n == 1:
    return
  prefix = barrier_key(name)
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  client.key_value_set(f'{prefix}{jax.process_index()}', 'ok' if not error else 'error: ' + error)
  deadline = time.time() + timeout_s
  last_log = time.time()
  while True:
    posted = dict(client.key_value_dir_get(prefix))
    got = {int(key.rsplit('/', 1)[-1]): v for key, v in posted.items()}
    if len(got) == n:
      break
    if time.time() > deadline:
      missing = sorted(set(range(n)) - set(got))
      raise DistributedError(f'{name}: processes {missing} of {n} did not reach the barrier within '
                             f'{timeout_s:.0f}s (dist.barrier_timeout_s); the others stop here')
    if time.time() - last_log > 30:
      last_log = time.time()
      logging.info('%s: waiting for processes %s', name, sorted(set(range(n)) - set(got)))
    time.sleep(0.05)
  failed = {p: v for p, v in sorted(got.items()) if v != 'ok'}
  if failed:
    raise DistributedError(f'{name}: failed in process(es) {sorted(failed)}:\n' + '\n'.join(
        f'[process {p}] {v[len("error: "):]}' for p, v in failed.items()))
