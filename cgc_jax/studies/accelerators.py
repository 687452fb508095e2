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
  batch = {k: jax.ShapeDtypeStruct(s, input_pipeline.batch_dtype(k), sharding=sharding)
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


def abstract_crop_cut(config, mesh, num_channels: int, canvas_shape, num_cases: int,
                      image_dtype=np.float16):
  """(jitted device crop cut, abstract canvases, abstract draws) for train.crops_on = 'device':
  `num_cases` cases in canvases of `canvas_shape` replicated on every device of `mesh`, and one
  global batch's draws sharded along `data` (training.device_crops)."""
  from cgc_jax.training import device_crops  # pylint: disable=g-import-not-at-top
  keys = input_pipeline.batch_keys(config.train)
  lead = (num_cases,) + tuple(canvas_shape)
  rep, data = distributed.replicated(mesh), distributed.data_sharding(mesh)
  arrays = {k: jax.ShapeDtypeStruct(lead + tail, dt, sharding=rep) for k, (dt, tail) in
            device_crops.canvas_fields(keys, num_channels, image_dtype).items()}
  b = config.train.batch_size
  draws = {k: jax.ShapeDtypeStruct((b,) + tail(num_channels), dt, sharding=data)
           for k, (dt, tail) in device_crops.DRAW_FIELDS.items()}
  return device_crops.cut_fn(mesh, tuple(config.train.crop), keys), arrays, draws


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


def roofline(config, opts, table, nch: int):
  """--what=roofline: the train and sliding-window steps of `config` on this machine's mesh, their
  XLA cost, memory per device and predicted time on each of CHIPS; with opts.workdir (a prepared and
  pseudo-labelled workdir) the input pipeline's crops/s per host core beside what a step consumes.
  table(title, header, rows) prints a table."""
  import time  # pylint: disable=g-import-not-at-top
  mesh = distributed.mesh()
  n = mesh.devices.size
  if opts.batch:
    config.train.batch_size = opts.batch
  if config.train.batch_size % n:
    raise SystemExit(f'--what=roofline: the global batch ({config.train.batch_size}) must divide '
                     f'among the {n} devices: pass --batch={n * -(-config.train.batch_size // n)}')
  if config.model.conv_impl == 'auto':  # the accelerators' convolution, whatever runs here
    config.model.conv_impl = 'native'
  rows, step_s = [], {}
  for name, make in (('train step', abstract_train_step),
                     ('sliding-window batch', abstract_window_step)):
    fn, *args = make(config, mesh, nch)
    c = cost(fn, args)
    mem = device_memory(fn, args)
    pred = predicted_seconds(c['flops'], c['bytes'], n)
    step_s[name] = pred
    rows.append((name, c['flops'] / 1e12, c['bytes'] / 1e9,
                 *[f'{pred[k][0] * 1e3:.3g} / {pred[k][1] * 1e3:.3g}' for k in CHIPS],
                 f'{(mem["arguments"] + mem["temporaries"]) / 1e9:.3g}'))
  table(f'roofline: {config.model.dtype}, global batch {config.train.batch_size} crops of '
         f'{tuple(config.train.crop)} x {nch} ch, base {config.model.base}, {n} devices; predicted '
         f'ms per step on n chips at {MFU:.0%} MFU / memory-bound at full bandwidth',
         ['program', 'TFLOP', 'GB moved (unfused)'] + [f'{k} ms' for k in CHIPS] +
         [f'GB per device (as compiled on {jax.devices()[0].platform})'], rows)
  if not opts.workdir:
    print('\n(--workdir=W, a prepared and pseudo-labelled workdir, adds the input pipeline\'s '
          'rate)')
    return
  from cgc_jax import pipeline  # pylint: disable=g-import-not-at-top
  from cgc_jax.core import paths  # pylint: disable=g-import-not-at-top
  own = pipeline.workdir_config(opts.workdir)  # its stores; the crops are this config's
  prep, labels = paths.prepared_store(own, opts.workdir), paths.pl_store(own, opts.workdir)
  cases = [c for c in prep.complete_cases() if labels.is_complete(c)]
  sampler = input_pipeline.CropSampler(prep, labels, cases, config.train)
  sampler.open_cases()  # checksums and symmetry weights are paid once a run, not a crop
  sampler.local_batch(0)  # and the first batch's memory comes fresh from the OS: steady state next
  t0, steps = time.time(), max(1, opts.steps)
  for s in range(1, steps + 1):
    sampler.local_batch(s)
  per_core = steps * config.train.batch_size / (time.time() - t0)  # one thread: one core
  need = {k: config.train.batch_size / v[0] for k, v in step_s['train step'].items()}
  table(f'input pipeline: crops of {tuple(config.train.crop)} from {len(cases)} cases of '
         f'{opts.workdir}, one host thread',
         ['crops/s per core'] + [f'crops/s a {k} step consumes (n = {n})' for k in need] +
         [f'host cores to feed {k}' for k in need],
         [(per_core, *need.values(), *[f'{v / per_core:.2g}' for v in need.values()])])
  # train.crops_on = 'device': the host draws, the devices cut from the cases they hold
  from cgc_jax.training import device_crops  # pylint: disable=g-import-not-at-top
  dev = device_crops.DeviceCrops(sampler, mesh, place=False)
  dev.draws(0)
  t0 = time.time()
  for s in range(1, steps + 1):
    dev.draws(s)
  draws_per_core = steps * config.train.batch_size / (time.time() - t0)
  records = sampler.image_records()
  dtype = np.dtype(records[0]['dtype'])
  fn, *args = abstract_crop_cut(config, mesh, nch, dev.shape, len(cases), dtype)
  cut = predicted_seconds(0.0, cost(fn, args)['bytes'], n)
  gb = device_crops.canvas_bytes([r['shape'][:3] for r in records], sampler.crop, nch,
                                 dtype.itemsize, input_pipeline.batch_keys(config.train)) / 1e9
  table(f'crops cut on the devices (train.crops_on = device): the same {len(cases)} cases held on '
         f'each device in canvases of {dev.shape}',
         ['draws/s per host core', 'GB a device for the cases'] +
         [f'{k} ms to cut a batch (memory-bound, unfused bytes) / its predicted step'
          for k in CHIPS] + [f'host cores to feed {k}' for k in need],
         [(draws_per_core, gb,
           *[f'{cut[k][1] * 1e3:.3g} / {step_s["train step"][k][0] * 1e3:.3g}' for k in CHIPS],
           *[f'{v / draws_per_core:.2g}' for v in need.values()])])
