"""The accelerator programs without an accelerator: the train step and the sliding-window step
lowered for a device mesh and exported for GPU and TPU (`jax.export`), and their predicted cost
from XLA's cost analysis.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m cgc_jax.studies.benchmark --what=roofline --config=configs/brats.py

Nothing here allocates the model: the state and the batches are abstract (shapes, dtypes and
shardings), so the paper-size programs lower on a laptop. The predicted times are a roofline: the
step's FLOPs at a fraction (MFU) of the chip's dense bf16 peak, beside its bytes at the chip's
memory bandwidth. XLA:CPU's byte count is of the unfused program, so the memory-bound figure is an
upper bound; a GPU or TPU compiler fuses far more.
"""
import jax
from jax import export
import numpy as np

from cgc_jax.inference import sliding_window
from cgc_jax.model import train_state
from cgc_jax.runtime import distributed
from cgc_jax.training import input_pipeline
from cgc_jax.training import step as step_lib

# Dense bf16 FLOP/s and memory bandwidth (bytes/s) per chip, vendor figures.
CHIPS = {'H200': (989e12, 4.8e12), 'TPU v5p': (459e12, 2.76e12)}
MFU = 0.4  # the fraction of the bf16 peak a well-fed step reaches (the prediction's assumption)


def abstract_train_step(config, mesh, num_channels: int):
  """(jitted train step, abstract state, abstract global batch) for config on mesh: the batch is
  train.batch_size crops with input_pipeline.batch_keys' arrays, sharded along `data`."""
  tx, _ = train_state.make_optimizer(config.train)
  state = train_state.abstract_state(config, mesh, num_channels, tx)
  sharding = distributed.data_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(s, np.float32, sharding=sharding)
           for k, s in input_pipeline.batch_shapes(config.train, num_channels).items()}
  return step_lib.make_train_step(config, mesh, tx), state, batch


def abstract_window_step(config, mesh, num_channels: int):
  """(jitted sliding-window function, abstract params, abstract window batch): one batch of
  eval.batch_size windows (rounded up to the mesh) of the evaluation's window, with the config's
  flip TTA."""
  predictor = sliding_window.Predictor(config, mesh)
  tx, _ = train_state.make_optimizer(config.train)
  params = train_state.abstract_state(config, mesh, num_channels, tx).params['unet']
  windows = jax.ShapeDtypeStruct((predictor.batch,) + predictor.window + (num_channels,),
                                 np.float32, sharding=distributed.data_sharding(mesh))
  return predictor._fn, params, windows  # pylint: disable=protected-access


def export_for(fn, args, platforms=('cuda', 'tpu')) -> dict:
  """{platform: the serialized StableHLO of fn(*args) exported for it}; raises where a platform's
  lowering fails."""
  return {p: export.export(fn, platforms=[p])(*args).mlir_module_serialized for p in platforms}


def cost(fn, args) -> dict:
  """XLA's cost analysis of the whole (unpartitioned) program fn(*args): {'flops', 'bytes'}."""
  c = fn.lower(*args).cost_analysis()
  c = c[0] if isinstance(c, list) else c
  return {'flops': float(c.get('flops', 0.0)), 'bytes': float(c.get('bytes accessed', 0.0))}


def device_memory(fn, args) -> dict:
  """Bytes per device of the compiled program on this backend: arguments, outputs, temporaries."""
  m = fn.lower(*args).compile().memory_analysis()
  return {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
          'temporaries': m.temp_size_in_bytes}


def predicted_seconds(flops: float, nbytes: float, devices: int) -> dict:
  """{chip: (compute-bound s at MFU, memory-bound s)} for a program spread evenly over `devices`."""
  return {chip: (flops / (MFU * peak * devices), nbytes / (bandwidth * devices))
          for chip, (peak, bandwidth) in CHIPS.items()}
