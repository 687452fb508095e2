"""Benchmarks that print tables:

    python -m cgc_jax.studies.benchmark --what=W --config=configs/X.py ...


  --what=prepare    prepare s/case and MB/s with 1 and 2 workers beside plain NIfTI loading (floor)
  --what=gmm        this stage's GMM s/case beside scikit-learn fitted on ALL brain voxels (same K,
                    same initialisation) and the Dice agreement of the two P maps (needs a workdir
                    after --mode=prepare)
  --what=train      s/step, XLA FLOPs and GFLOP/s of the train step, of its convolutions alone, a
                    matmul peak, peak host memory; bf16 MFU on GPU; where the step's time goes,
                    op by op and grouped (studies/profile.py; --noprofile skips it)
  --what=conv       the step's 3x3x3 convolutions (forward + both backward) in every formulation:
                    native, sum2d (unet.py), onednn (onednn.py, where built) and the candidates
                    of conv_variants.py
  --what=inference  sliding-window time and voxels/s on one volume (default 240x240x155), +- flip
  TTA
  --what=roofline   the train and sliding-window steps on this machine's devices (8 fake CPU
                    devices with XLA_FLAGS=--xla_force_host_platform_device_count=8): FLOPs and
                    bytes from XLA's cost analysis, the predicted step time on H200 and TPU v5p at
                    40% MFU, memory per device as compiled here, and (with --workdir, any prepared
                    and pseudo-labelled one) the input pipeline's crops/s per host core, cropped as
                    this config crops, against what that step consumes (studies/accelerators.py)
  --against=torch   train and inference: the same U-Net in PyTorch (torch_peer.py) timed in the same
                    run (in a process of its own), and the ratio (needs `pip install torch`; never
                    needed by the product)

Figures depend on the machine: compare ratios from one run. JAX is imported only by the benchmarks
that use it, so the prepare benchmark's spawned workers start as fast as the CLI's.
"""
import dataclasses
import os
import resource
import shutil
import tempfile
import time

from absl import app
from absl import flags
import nibabel as nib
import numpy as np
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags():
  """The command line's flags: defined only when run as a program, so importing this module (tests,
  other programs) does not clash with another entry point's flags of the same names."""
  config_flags.DEFINE_config_file('config', None, 'configs/*.py file', lock_config=False)
  flags.DEFINE_enum('what', 'train', ['prepare', 'gmm', 'train', 'conv', 'inference', 'roofline'],
                    'benchmark')
  flags.DEFINE_string('workdir', '', 'workdir (gmm: a prepared one; others: scratch, default temp)')
  flags.DEFINE_integer('steps', 3, 'timed train steps (after one warm-up step)')
  flags.DEFINE_integer('batch', 0, 'train: global batch override (0 = config)')
  flags.DEFINE_string('volume', '240,240,155', 'inference: volume shape')
  flags.DEFINE_bool('tta', True, 'inference: also time flip TTA')
  flags.DEFINE_integer('max_cases', 0, 'prepare/gmm: at most this many cases (0 = all)')
  flags.DEFINE_bool('profile', True, 'train: also the per-op profile of the step')
  flags.DEFINE_bool('baselines', True,
                    'train: also time the convolutions alone and a matmul (the step\'s yardsticks)')
  flags.DEFINE_enum('against', '', ['', 'torch'],
                    'train/inference: also time this peer in the same run')


@dataclasses.dataclass
class Options:
  """The command line's options (read once, in main)."""
  workdir: str = ''
  steps: int = 3
  batch: int = 0
  volume: tuple = (240, 240, 155)
  tta: bool = True
  max_cases: int = 0
  against: str = ''
  profile: bool = False
  baselines: bool = True

# Peak dense bf16 FLOP/s by device kind (vendor figures), for MFU.
_PEAK_BF16 = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'TPU v4': 275e12, 'TPU v5': 459e12}


def _table(title, header, rows):
  print(f'\n{title}')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for r in rows:
    print('| ' + ' | '.join(f'{v:.4g}' if isinstance(v, float) else str(v) for v in r) + ' |')


def _peak_rss_gb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def bench_prepare(config, opts: Options):
  from cgc_jax.stages import prepare  # pylint: disable=g-import-not-at-top
  files = prepare.case_files(config, opts.workdir or tempfile.mkdtemp())
  if opts.max_cases:
    files = files[:opts.max_cases]
  t0 = time.time()
  nbytes = 0
  for f in files:
    for p in list(f.images.values()) + ([f.label] if f.label else []):
      nbytes += np.asarray(nib.load(p).dataobj, np.float32).nbytes
  floor = time.time() - t0
  rows = [('load NIfTI only (floor)', 1, floor / len(files), nbytes / 1e6 / floor, 1.0)]
  for workers in (1, 2):
    wd = tempfile.mkdtemp(prefix='cgc_bench_prep_')
    config.data.num_workers = workers
    t0 = time.time()
    prepare.run(config, wd)
    dt = time.time() - t0
    rows.append(("prepare", workers, dt / len(files), nbytes / 1e6 / dt, dt / floor))
    shutil.rmtree(wd, ignore_errors=True)
  _table(f'prepare: {len(files)} cases, {nbytes / 1e6:.0f} MB decoded',
         ['what', 'workers', 's/case', 'MB/s', 'x floor'], rows)


def bench_gmm(config, opts: Options):
  from cgc_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cgc_jax.imaging import metrics  # pylint: disable=g-import-not-at-top
  from cgc_jax.labels import gmm  # pylint: disable=g-import-not-at-top
  prep = paths.prepared_store(config, opts.workdir)
  cases = prep.complete_cases()[:opts.max_cases or None]
  if not cases:
    raise app.UsageError(f'no prepared cases in {opts.workdir}: run --mode=prepare first')
  g = config.gmm
  rows = []
  for c in cases:
    meta = prep.meta(c)
    mods = meta['modalities']
    image = np.asarray(prep.read(c, 'image'), np.float32)
    brain = np.asarray(prep.read(c, 'brain')) > 0
    chans = [mods.index(m) for m in g.channels]
    li = list(g.channels).index(g.lesion_channel)
    t0 = time.time()
    _, p_sub, _ = gmm.pseudo_label(image, brain, chans, li, g, c)
    t_sub = time.time() - t0
    t0 = time.time()
    _, p_full, _ = gmm.pseudo_label(image, brain, chans, li, g, c, full_fit=True)
    t_full = time.time() - t0
    rows.append((c, int(brain.sum()), t_sub, t_full, t_full / t_sub, metrics.dice(p_sub, p_full)))
  rows.append(
      ('mean', '', float(np.mean([r[2] for r in rows])), float(np.mean([r[3] for r in rows])),
       float(np.mean([r[4] for r in rows])), float(np.mean([r[5] for r in rows]))))
  _table(
      f'gmm: K={g.k}, {g.bins} levels per channel, k-means start on {g.subsample} voxels, '
      f'channels {tuple(g.channels)}',
      ['case', 'brain voxels', 's (ours)', 's (sklearn, all voxels)', 'speed-up', 'Dice agreement'],
      rows)


def _in_fresh_process(fn, *args):
  """fn(*args) in a new Python process (spawned, so nothing of this one is inherited): the
  PyTorch peer runs without this process's JAX and oneDNN threads (a second OpenMP runtime in one
  process slows PyTorch's by about a fifth)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  with multiprocessing.get_context('spawn').Pool(1) as pool:
    return pool.apply(fn, args)


def _cost_flops(compiled):
  import jax  # pylint: disable=g-import-not-at-top
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get('flops', float('nan')))


def _time(fn, *args, n=3):
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  t0 = time.time()
  for _ in range(n):
    jax.block_until_ready(fn(*args))
  return (time.time() - t0) / n


def _conv_shapes(config, batch):
  """(x shape, cin, cout) of every 3x3x3 conv of the U-Net for one step."""
  m = config.model
  crop = np.asarray(config.train.crop)
  shapes, cin = [], config_channels(config)
  for i in range(m.levels):
    s = tuple(int(v) for v in crop // 2**i)
    c = m.base * 2**i
    shapes += [((batch,) + s, cin, c), ((batch,) + s, c, c)]
    cin = c
  for i in reversed(range(m.levels - 1)):
    s = tuple(int(v) for v in crop // 2**i)
    c = m.base * 2**i
    shapes += [((batch,) + s, 2 * c, c), ((batch,) + s, c, c)]
  return shapes


def _conv_flops(config, batch):
  """Direct-convolution FLOP count of one step's 3x3x3 convolutions, forward and both backward
  (the image is not differentiated, so the first convolution has no input gradient)."""
  per_conv = [2 * 27 * int(np.prod(s)) * ci * co for s, ci, co in _conv_shapes(config, batch)]
  return 3 * sum(per_conv) - per_conv[0]


def _conv_args(config, batch, dtype, rng):
  """(inputs, kernels, output cotangents) of every 3x3x3 conv of one step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  shapes = _conv_shapes(config, batch)
  xs = [jnp.asarray(rng.normal(size=s + (ci,)), dtype) for s, ci, _ in shapes]
  ks = [jnp.asarray(rng.normal(size=(3, 3, 3, ci, co)) * 0.01, dtype) for _, ci, co in shapes]
  gs = [jnp.asarray(rng.normal(size=s + (co,)), dtype) for s, _, co in shapes]
  return xs, ks, gs


def _convs_fn(conv):
  """f(xs, ks, gs): each conv's forward output and its two backward convolutions (input and kernel
  gradient) for a given output cotangent, as in the step; the first conv's input gradient is not
  needed there (the image is not differentiated), so not here either. (The gradient of a plain sum
  of the outputs would let XLA drop the forward convolutions: a floor a third too low.)"""
  import jax  # pylint: disable=g-import-not-at-top

  def convs(xs, ks, gs):
    out = []
    for i, (x, k, g) in enumerate(zip(xs, ks, gs)):
      if i == 0:
        y, vjp = jax.vjp(lambda k, x=x: conv(x, k), k)
      else:
        y, vjp = jax.vjp(conv, x, k)
      out.append((y, vjp(g)))
    return out
  return convs


def bench_conv(config, opts: Options):
  """Every formulation of the 3x3x3 convolution (unet.conv3x3x3's native and sum2d, and
  conv_variants') on the config's convolutions, forward + both backward, in one run."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cgc_jax.model import onednn  # pylint: disable=g-import-not-at-top
  from cgc_jax.model import unet  # pylint: disable=g-import-not-at-top
  from cgc_jax.studies import conv_variants  # pylint: disable=g-import-not-at-top
  b = opts.batch or config.train.batch_size
  args = _conv_args(config, b, jnp.float32, np.random.default_rng(0))
  impls = {'native': lambda x, k: unet.conv3x3x3(x, k, 'native'),
           'sum2d': lambda x, k: unet.conv3x3x3(x, k, 'sum2d'), **conv_variants.VARIANTS}
  if onednn.available():
    impls['onednn'] = onednn.conv3d
  else:
    print(f'(no onednn row: {onednn.reason()})')
  flops = _conv_flops(config, b)
  rows, times = [], {}
  for name, conv in impls.items():
    fn = jax.jit(_convs_fn(conv))
    times[name] = _time(fn, *args, n=max(1, opts.steps))
    rows.append((name, times[name], flops / times[name] / 1e9, ''))
  rows = [r[:3] + (times[r[0]] / times['sum2d'],) for r in rows]
  _table(f'3x3x3 convolutions of one step, forward + both backward ({len(args[0])} convs, crop '
         f'{tuple(config.train.crop)}, base {config.model.base}, batch {b}, '
         f'{jax.devices()[0].device_kind}; GFLOP/s from the direct-convolution count '
         f'{flops / 1e9:.4g} GFLOP)', ['formulation', 's', 'GFLOP/s', 'time / sum2d'], rows)


def config_channels(config):
  return len(config.data.modalities)


def bench_train(config, opts: Options):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cgc_jax.model import train_state, unet  # pylint: disable=g-import-not-at-top
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from cgc_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top
  from cgc_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  mesh = distributed.mesh()
  if opts.batch:
    config.train.batch_size = opts.batch
  b = config.train.batch_size
  nch = config_channels(config)
  crop = tuple(config.train.crop)
  tx, _ = train_state.make_optimizer(config.train)
  state = train_state.create_state(config, mesh, nch, tx)
  rng = np.random.default_rng(0)
  batch = input_pipeline.synthetic_batch(config.train, nch, rng)  # the keys the step reads
  batch = distributed.global_batch(batch, distributed.data_sharding(mesh))
  step = step_lib.make_train_step(config, mesh, tx)
  compiled = step.lower(state, batch).compile()
  impl = unet.resolve_conv_impl(config.model.conv_impl)
  # XLA does not count a foreign call's work: add the convolutions' count (oneDNN runs float32;
  # other dtypes take sum2d, which XLA counts)
  foreign = impl == 'onednn' and config.model.dtype == 'float32'
  flops = _cost_flops(compiled) + (_conv_flops(config, b) if foreign else 0)
  state, _ = step(state, batch)  # warm-up
  jax.block_until_ready(state)
  t0 = time.time()
  for _ in range(opts.steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  dt = (time.time() - t0) / opts.steps
  rows = [('train step', dt, flops / 1e9, flops / dt / 1e9, b * np.prod(crop) / dt)]
  mm_rate = None  # FLOP/s of the matmul yardstick, with opts.baselines
  if opts.baselines:
    # convolutions alone, forward + backward, same shapes and dtype and implementation
    dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.model.dtype]
    conv_args = _conv_args(config, b, dtype, rng)
    conv_fn = jax.jit(_convs_fn(lambda x, k: unet.conv3x3x3(x, k, impl)))
    conv_flops = _cost_flops(conv_fn.lower(*conv_args).compile())
    conv_flops += _conv_flops(config, b) if foreign else 0
    conv_dt = _time(conv_fn, *conv_args, n=max(1, opts.steps))
    n = 4096 if jax.default_backend() != 'cpu' else 2048
    a = jnp.asarray(rng.normal(size=(n, n)), dtype)
    mm = jax.jit(lambda a: a @ a)
    mm_dt = _time(mm, a, n=5)
    mm_rate = 2 * n**3 / mm_dt
    rows += [('convolutions alone (fwd+bwd)', conv_dt, conv_flops / 1e9,
              conv_flops / conv_dt / 1e9, ''),
             (f'matmul {n}x{n} ({config.model.dtype})', mm_dt, 2 * n**3 / 1e9, mm_rate / 1e9,
              '')]
  _table(
      f'train: {crop} x {nch} ch, base {config.model.base}, global batch {b}, '
      f'{jax.device_count()} x {jax.devices()[0].device_kind}, conv {impl}, {config.model.dtype}',
      ['what', 's', 'GFLOP', 'GFLOP/s', 'voxels/s'], rows)
  if opts.baselines:
    print(f'\nstep / convolutions-alone time: {dt / conv_dt:.2f}x', end='; ')
  print(f'peak host memory {_peak_rss_gb():.2f} GB')
  if opts.profile:
    from cgc_jax.studies import profile  # pylint: disable=g-import-not-at-top
    state, groups = profile.profile_train(step, state, batch, max(1, opts.steps))
    busy = sum(v[0] for v in groups.values())
    _table(f'where the step goes (ops\' own time summed over threads: {busy / 1e6:.0f} ms a step '
           f'against {dt * 1e3:.0f} ms wall)', ['group', 'ms/step', 'share', 'backward ms', 'ops'],
           [(g, v[0] / 1e6, f'{v[0] / busy:.0%}', v[1] / 1e6, v[2]) for g, v in groups.items()])
  if opts.against == 'torch':
    from cgc_jax.studies import torch_peer  # pylint: disable=g-import-not-at-top
    t_dt = _in_fresh_process(torch_peer.time_train_step, config, nch, opts.steps)
    version, threads = _in_fresh_process(torch_peer.info)
    _table(f'train step side by side ({crop} x {nch} ch, base {config.model.base}, batch {b}; '
           f'torch {version}, {threads} threads, in its own process)',
           ['what', 's/step', 'GFLOP/s (XLA count)', 'x matmul peak', 'torch / cgc_jax'],
           [('cgc_jax (JAX, conv ' + impl + ')', dt, flops / dt / 1e9,
             flops / dt / mm_rate if mm_rate else '', ''),
            ('PyTorch (same U-Net)', t_dt, flops / t_dt / 1e9,
             flops / t_dt / mm_rate if mm_rate else '', t_dt / dt)])
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in _PEAK_BF16.items() if k in kind), None)
  if peak and jax.default_backend() != 'cpu':
    print(f'MFU ({config.model.dtype}, vs {peak / 1e12:.0f} TFLOP/s bf16 peak per device): '
          f'{flops / dt / (peak * jax.device_count()) * 100:.1f}%')
    try:
      stats = jax.devices()[0].memory_stats()
      print(f'peak device memory: {stats.get("peak_bytes_in_use", 0) / 1e9:.2f} GB')
    except Exception:  # pylint: disable=broad-except
      pass


def bench_inference(config, opts: Options):
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from cgc_jax.inference import sliding_window
  from cgc_jax.model import train_state
  from cgc_jax.runtime import distributed
  mesh = distributed.mesh()
  shape = tuple(opts.volume)
  nch = config_channels(config)
  params = train_state.init_params(config, jax.random.key(0), nch)['unet']
  params = jax.device_put(params, distributed.replicated(mesh))
  image = np.random.default_rng(0).normal(size=shape + (nch,)).astype(np.float32)
  rows = []
  for tta in ([False, True] if opts.tta else [False]):
    config.eval.tta_flip = tta
    pred = sliding_window.Predictor(config, mesh)
    n_win = int(np.prod([len(s) for s in sliding_window.compute_steps(
        [max(s, w) for s, w in zip(shape, pred.window)], pred.window, pred.overlap)]))
    t0 = time.time()
    pred.predict_volume(params, image)  # includes compilation
    first = time.time() - t0
    t0 = time.time()
    pred.predict_volume(params, image)
    dt = time.time() - t0
    rows.append(('flip TTA (8)' if tta else 'no TTA', n_win, first, dt, np.prod(shape) / dt))
    if opts.against == 'torch':
      from cgc_jax.studies import torch_peer  # pylint: disable=g-import-not-at-top
      t_dt = _in_fresh_process(torch_peer.time_inference, config, nch, shape, pred.window,
                               pred.overlap, np.asarray(pred.gauss), pred.batch, tta)
      rows.append((f'PyTorch, {"flip TTA (8)" if tta else "no TTA"} (torch / cgc_jax '
                   f'{t_dt / dt:.2f}x)', n_win, '', t_dt, np.prod(shape) / t_dt))
  _table(f'inference: volume {shape} x {nch} ch, window {pred.window}, overlap {pred.overlap}, '
         f'base {config.model.base}, {jax.device_count()} x {jax.devices()[0].device_kind}',
         ['mode', 'windows', 'first call s (compile)', 's', 'voxels/s'], rows)
  print(f'peak host memory {_peak_rss_gb():.2f} GB')


def bench_roofline(config, opts: Options):
  """The accelerators' predicted step times and the input pipeline's rate (studies.accelerators)."""
  from cgc_jax.studies import accelerators  # pylint: disable=g-import-not-at-top
  accelerators.roofline(config, opts, _table, config_channels(config))


def main(argv):
  del argv
  opts = Options(workdir=FLAGS.workdir, steps=FLAGS.steps, batch=FLAGS.batch,
                 volume=tuple(int(v) for v in FLAGS.volume.split(',')), tta=FLAGS.tta,
                 max_cases=FLAGS.max_cases, against=FLAGS.against, profile=FLAGS.profile,
                 baselines=FLAGS.baselines)
  {'prepare': bench_prepare, 'gmm': bench_gmm, 'train': bench_train, 'conv': bench_conv,
   'inference': bench_inference, 'roofline': bench_roofline}[FLAGS.what](FLAGS.config, opts)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main)
