"""Process start-up, the device mesh, and host-local data -> global jax.Array.

One function owns start-up (`initialize`); one helper turns each process's NumPy slice into the
global batch (`global_batch`), naming the array that failed.
"""
import os

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_INITIALIZED = False


def initialize(expected_devices: int = 0):
  """Calls jax.distributed.initialize() when the job is multi-process; logs the layout.

  Multi-process when JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) is set, or under
  SLURM with more than one task, or on a Cloud TPU pod (auto-detected by JAX).
  """
  global _INITIALIZED
  if not _INITIALIZED:
    coord = os.environ.get('JAX_COORDINATOR_ADDRESS')
    slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
    if coord:
      jax.distributed.initialize(
          coordinator_address=coord, num_processes=int(os.environ['JAX_NUM_PROCESSES']),
          process_id=int(os.environ['JAX_PROCESS_ID']),
          initialization_timeout=int(os.environ.get('JAX_INIT_TIMEOUT', '300')))
    elif slurm:
      jax.distributed.initialize()
    _INITIALIZED = True
  logging.info('JAX: process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  if expected_devices and jax.device_count() != expected_devices:
    raise RuntimeError(f'expected {expected_devices} devices, found {jax.device_count()} '
                       '(under SLURM, give each process all its GPUs or one GPU per process)')


def mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ('data',))


def data_sharding(m: Mesh) -> NamedSharding:
  return NamedSharding(m, P('data'))


def replicated(m: Mesh) -> NamedSharding:
  return NamedSharding(m, P())


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """{name: np[B_local, ...]} of this process -> {name: jax.Array[B_global, ...]} sharded on batch."""
  out = {}
  for k, v in local.items():
    try:
      out[k] = jax.make_array_from_process_local_data(sharding, v)
    except Exception as e:
      raise ValueError(f'global batch: array {k!r} with local shape {np.shape(v)} could not be '
                       f'assembled on {sharding}: {e}') from e
  return out


def is_main() -> bool:
  return jax.process_index() == 0
