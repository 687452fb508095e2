"""Trained networks back from a workdir: the U-Net parameters of the chosen checkpoint of each
network (one, the folds of cross-fitting, or an ensemble), replicated on a mesh, after their model
fields are checked against the config."""
from absl import logging
import jax

from cgc_jax import errors
from cgc_jax.core import compat
from cgc_jax.core import fingerprints
from cgc_jax.core import folds as folds_lib
from cgc_jax.core import paths
from cgc_jax.inference import tracking
from cgc_jax.model import checkpoint
from cgc_jax.model import train_state


def restore_params(config, workdir, mesh, num_channels: int):
  """(params, step): the U-Net params of checkpoint config.eval.step (-1: as eval.select says;
  'latest': the newest readable), replicated on `mesh`. eval.average_checkpoints = n > 1: the
  element-wise mean of the params of the n newest kept checkpoints up to that step (fewer when
  fewer are kept, with a warning); `step` is still the newest of them. `workdir`: the folder
  holding checkpoints/ (WORKDIR, or one network's folds.run_dirs folder)."""
  params, step, _ = _restore(config, workdir, mesh, num_channels)
  return params, step


def restore_networks(config, workdir, mesh, num_channels: int):
  """(nets, step): nets = [(params, the cases that network trained on)], one per network of
  train.folds or train.ensemble (one network: [(params, every training case)]), each restored as
  restore_params does; step: the evaluated checkpoint step (a list when the networks' steps
  differ)."""
  nets, steps = [], []
  for d in folds_lib.network_dirs(config, workdir):
    params, step, seen = _restore(config, d, mesh, num_channels)
    nets.append((params, frozenset(seen)))
    steps.append(step)
  return nets, steps[0] if len(set(steps)) == 1 else steps


def _restore(config, workdir, mesh, num_channels: int):
  """restore_params, plus the cases the checkpoint was trained on (its record's P inputs)."""
  tx, _ = train_state.make_optimizer(config.train)
  target = train_state.abstract_state(config, mesh, num_channels, tx)
  ckpt = checkpoint.Checkpointer(paths.checkpoints(workdir), config.train.keep_checkpoints)
  if ckpt.latest_step() is None:
    raise errors.StageError(f'{ckpt.directory}: no checkpoint: run --mode=train first')
  step = None if config.eval.step < 0 else config.eval.step
  if step is None and config.eval.select != 'latest':
    step = tracking.selected_step(config, workdir, ckpt.all_steps())
  if step is not None and step not in ckpt.all_steps():
    raise errors.StageError(f'{ckpt.directory}: no checkpoint at step {step} (have '
                             f'{ckpt.all_steps()})')
  try:  # the model fields first: a changed width would otherwise fail as an unreadable checkpoint
    _check_model(ckpt.record(step if step is not None else ckpt.latest_step()), config,
                 ckpt.directory)
  except checkpoint.IncompatibleCheckpointError:
    ckpt.close()
    raise
  except Exception:  # pylint: disable=broad-except
    pass  # an unreadable record: restore falls back to an older step and says so
  state, record, s = ckpt.restore(target, step)
  _check_model(record, config, ckpt.directory)  # the step restored may be an older one
  params = state.params['unet']
  n = int(config.eval.get('average_checkpoints', 0))
  if n > 1:
    steps = [t for t in ckpt.all_steps() if t < s][-(n - 1):]
    if len(steps) < n - 1:
      logging.warning('evaluate: eval.average_checkpoints=%d but only steps %s are kept up to step '
                      '%d: averaging those', n, steps + [s], s)
    for t in steps:  # a running sum of replicated arrays: no host copy, any number of processes
      other = ckpt.restore(target, t)[0].params['unet']
      params = jax.tree.map(lambda a, b: a + b, params, other)
    params = jax.tree.map(lambda a: a / (len(steps) + 1), params)
    logging.info('evaluate: params averaged over checkpoint steps %s', steps + [s])
  ckpt.close()
  return params, s, compat.trained_cases(record)


def _check_model(record: dict, config, directory: str):
  """Raises IncompatibleCheckpointError when the checkpoint's model fields differ from config's."""
  diffs = fingerprints.diff(record.get('fields', {}).get('model', {}),
                            fingerprints.fields(config, 'train')['model'])
  if diffs:
    raise checkpoint.IncompatibleCheckpointError(
        f'{directory}: the model differs from the checkpoint\'s: '
        f'{", ".join("model." + d for d in diffs)}; evaluate with the config it was trained with '
        '(WORKDIR/config.json)')
