"""Where the train step's time goes: a per-op profile from JAX's profiler, grouped by what each
compiled op computes.

    python -m cgc_jax.studies.benchmark --what=train --config=configs/brats_sample.py

The step runs `steps` times under jax.profiler.trace; every executed op (an XLA thunk: a fusion, a
convolution, a oneDNN custom call) is matched by name to the compiled HLO, and its JAX op_name
metadata (jit(train_step)/jvp(UNet3D)/DoubleConv_0/InstanceNorm_1/sub, ...) gives its group:

  convolutions     the 3x3x3 convolutions, forward and both backward (oneDNN calls or XLA's)
  up-convolutions  the transposed convolutions of the decoder (UpConv_*)
  normalisation    instance (or group) norm, forward and backward
  activation       ReLU
  pooling          max pooling and its gradient
  rest of U-Net    concatenations, splits, the 1x1x1 head
  losses and CGC   the segmentation loss and the contrastive terms (outside the U-Net's modules)
  optimiser        AdamW, clipping, the schedule (no module: the update after the gradient)

Times are the ops' own durations summed over the threads that ran them (XLA's CPU runtime runs
independent ops concurrently), so the column sums to more than the wall-clock step on several
threads; the share column is of that sum.
"""
import collections
import glob
import os
import re
import tempfile

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\((.*)$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
GROUPS = ('convolutions', 'up-convolutions', 'normalisation', 'activation', 'pooling',
          'rest of U-Net', 'losses and CGC', 'optimiser')


def op_table(hlo_text: str) -> dict:
  """{instruction name: (opcode, op_name, custom-call target)} of a compiled module's HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name_meta = _OP_NAME.search(line)
    target = _TARGET.search(line)
    out[m.group(1)] = (m.group(2), name_meta.group(1) if name_meta else '',
                       target.group(1) if target else '')
  return out


def group_of(opcode: str, op_name: str, target: str = '') -> str:
  """One of GROUPS for a compiled op (see the module docstring)."""
  if 'UpConv' in op_name:
    return 'up-convolutions'
  if 'onednn' in target or opcode == 'convolution':
    return 'convolutions'
  if re.search(r'(Instance|Group|Layer|Batch)Norm', op_name):
    return 'normalisation'
  if 'relu' in op_name:
    return 'activation'
  if 'pool' in op_name or 'reduce_window' in op_name or 'select_and_scatter' in op_name:
    return 'pooling'
  if 'UNet3D' in op_name:
    return 'rest of U-Net'
  if 'jvp(' in op_name:
    return 'losses and CGC'
  return 'optimiser'


def op_durations(xplane_path: str, ops: dict) -> dict:
  """{instruction name: total ns} over every executed op of the trace that `ops` (op_table) names;
  the executor's own events (waits, thread-pool bookkeeping) are left out."""
  import jax  # pylint: disable=g-import-not-at-top
  data = jax.profiler.ProfileData.from_file(xplane_path)
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for e in line.events:
        if e.name in ops:
          total[e.name] += e.duration_ns
  return dict(total)


def grouped(durations: dict, ops: dict) -> dict:
  """{group: [total ns, of which backward ns, ops]} (backward: op_name under transpose(...))."""
  out = {g: [0.0, 0.0, 0] for g in GROUPS}
  for name, ns in durations.items():
    opcode, op_name, target = ops[name]
    row = out[group_of(opcode, op_name, target)]
    row[0] += ns
    row[1] += ns if 'transpose(' in op_name else 0.0
    row[2] += 1
  return out


def profile_train(step, state, batch, steps: int) -> tuple:
  """Runs the jitted train step (state donated: each call takes the last's state) `steps` times
  under the profiler after one warm-up. Returns (state, {group: [ns per step, of which backward,
  ops]})."""
  import jax  # pylint: disable=g-import-not-at-top
  ops = op_table(step.lower(state, batch).compile().as_text())
  state, m = step(state, batch)
  jax.block_until_ready(m)
  d = tempfile.mkdtemp(prefix='cgc_profile_')
  with jax.profiler.trace(d):
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
  paths = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    raise RuntimeError(f'{d}: the profiler wrote no trace')
  rows = grouped(op_durations(paths[0], ops), ops)
  return state, {g: [v[0] / steps, v[1] / steps, v[2]] for g, v in rows.items()}
