"""orbax checkpoints of the train state plus a JSON record (config fields, data-iterator state).

A checkpoint at step s holds the state AFTER s optimiser steps; the data iterator resumes at batch
s. Saves are asynchronous (orbax writes in a background thread after copying arrays to host), so the
donated state can be reused at once. If the newest checkpoint cannot be read, restore falls back to
the previous one with a warning naming both steps.
"""
import logging as std_logging
import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from cgc_jax import errors
from cgc_jax.core import fingerprints
from cgc_jax.model import train_state


IncompatibleCheckpointError = errors.IncompatibleCheckpointError

# A replicated array smaller than this is written whole by its first replica. Off GPU, orbax splits
# every replicated array across its replicas, one dispatched slice per replica and array; for this
# U-Net's small arrays that takes longer than the write it parallelises (a save of the tests'
# 8-device state: 2.3 s). The files are the same either way.
MIN_REPLICA_PARALLEL_BYTES = 64 << 20


def _register_array_handler():
  absl_logger = std_logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)  # orbax warns on every override; this one is meant
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES),
        override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


class Checkpointer:

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, record: dict):
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    record=ocp.args.JsonSave(record)), force=True)

  def record(self, step: int) -> dict:
    """The JSON record of checkpoint `step` alone (cheap: no arrays are read)."""
    return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record

  def restore(self, abstract_state, step=None):
    """Restores (state, record, step) at `step` (default newest, falling back to older ones)."""
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      raise FileNotFoundError(f'{self.directory}: no checkpoint')
    errors = []
    for s in steps:
      try:
        r = self._restore_step(s, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        errors.append((s, e))
        logging.warning('checkpoint at step %d is unreadable (%s: %s); trying an older one', s,
                        type(e).__name__, str(e)[:200])
        continue
      if errors:
        logging.warning('restored step %d instead of the newest step %d, which is unreadable', s,
                        errors[0][0])
      return r
    raise FileNotFoundError(f'{self.directory}: no readable checkpoint ({errors[-1][1]})')

  def _restore_step(self, s: int, abstract_state):
    """(state, record, s) of step s; a checkpoint in the layout before TrainState lost its unused
    `rng` (train_state.LegacyTrainState) is read through that layout, `rng` dropped."""
    def read(target):
      r = self.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
      return r.state, r.record, s
    try:
      return read(abstract_state)
    except Exception:  # pylint: disable=broad-except
      if not isinstance(abstract_state, train_state.TrainState):
        raise
      try:
        legacy, record, _ = read(train_state.LegacyTrainState.abstract(abstract_state))
      except Exception:  # pylint: disable=broad-except
        pass  # not the legacy layout either: the first error is the one to report
      else:
        return legacy.current(), record, s
      raise

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def check_compatible(record: dict, config, directory: str):
  """Raises IncompatibleCheckpointError listing the differing fields."""
  diffs = fingerprints.diff(record.get('fields', {}), fingerprints.fields(config, 'train'))
  if diffs:
    raise IncompatibleCheckpointError(
        f'{directory}: checkpoints were written with a different config; differing fields:\n  ' +
        '\n  '.join(diffs) + '\nUse a new --workdir, or the original config, to continue.')
