"""Training crops cut on the devices, from every training case held in device memory
(train.crops_on = 'device').

The host path (input_pipeline.CropSampler.iterate) cuts each crop on host threads from the
memory-mapped shards and sends it whole: at the paper's crop a host core makes about 14 crops/s,
where eight H200s would consume about 1,000 (docs/benchmarks.md). Here every training case is put
once on every device, and a step sends only each slot's random choices, drawn by the sampler's own
`draw`: the case, the crop's corner, the flips and the intensity jitter, 8 + 2C numbers a crop.
One jitted program per step cuts, flips and jitters each device's rows of the global batch on that
device. The batch is the host path's: P, the brain mask, the posterior and the weights bit for bit,
the jittered image to one float32 rounding (XLA fuses the multiply and the add into one
multiply-add, which an optimization barrier does not prevent).

Device memory: every case padded into one canvas of shape L (per axis, the largest of
max(0, crop - size) + max(size, crop) over the cases, so that every corner the sampler draws lies
inside), for each of the batch's arrays: the image [N, L, C] in the prepared shards' dtype (float16
or float32; cut as float32), p and brain u8[N, L], posterior f32 and label_weight f32 where the
config has them (input_pipeline.batch_keys). `DeviceCrops.nbytes` is that figure per device; the
train stage logs it. `train.crops_on = 'auto'` (the default) cuts on the devices when they are GPUs
or TPUs and that figure is at most `train.crops_device_memory` of a device's memory (`choose`).
Not supported: train.spatial_p > 0 (rotation and zoom stay on the host; the config rules reject
'device' with it and 'auto' keeps the host).
"""
import collections
import concurrent.futures as cf
import functools
import time

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cgc_jax.runtime import distributed
from cgc_jax.training import input_pipeline

# a slot's draw, as the arrays the devices receive: name -> (dtype, trailing shape given C)
DRAW_FIELDS = {'case': (np.int32, lambda c: ()), 'corner': (np.int32, lambda c: (3,)),
               'flip': (np.bool_, lambda c: (3,)), 'scale': (np.float32, lambda c: (c,)),
               'shift': (np.float32, lambda c: (c,)), 'weight': (np.float32, lambda c: ())}


def canvas(shapes: list, crop) -> tuple:
  """(L, offsets): the canvas shape L (3 ints) holding every case of `shapes` (each (X, Y, Z)) so
  that any corner the sampler draws for a crop of `crop` lies inside it once shifted by the case's
  offset (offsets: int[N, 3], max(0, crop - size) per axis: a case smaller than the crop sits that
  far in, as the sampler's negative corners expect)."""
  s = np.asarray(shapes, np.int64).reshape(-1, 3)
  c = np.asarray(crop, np.int64)
  offsets = np.maximum(0, c - s)
  return tuple(int(v) for v in (offsets + np.maximum(s, c)).max(0)), offsets


def canvas_fields(keys, num_channels: int, image_dtype, voxel_weights: bool = True) -> dict:
  """The canvases a batch with `keys` (batch_keys) needs: {name: (dtype, trailing shape)}; the
  image in `image_dtype` (the prepared shards'), label_weight only with `voxel_weights` (some
  case has voxel weights; without them the cut writes the case weight alone)."""
  out = {'image': (np.dtype(image_dtype), (num_channels,)), 'p': (np.dtype(np.uint8), ()),
         'brain': (np.dtype(np.uint8), ())}
  if 'posterior' in keys:
    out['posterior'] = (np.dtype(np.float32), ())
  if 'label_weight' in keys and voxel_weights:
    out['label_weight'] = (np.dtype(np.float32), ())
  return out


def canvas_bytes(shapes: list, crop, num_channels: int, image_itemsize: int, keys) -> int:
  """Bytes of the canvases of cases `shapes` for a batch with `keys` (label_weight counted as a
  voxel canvas: an upper bound)."""
  n = len(shapes) * int(np.prod(canvas(shapes, crop)[0]))
  fields = canvas_fields(keys, num_channels, np.dtype(f'f{image_itemsize}'))
  return n * sum(dt.itemsize * int(np.prod(tail)) for dt, tail in fields.values())


def choose(sampler: input_pipeline.CropSampler, devices=None) -> tuple:
  """(cut on the devices?, why) for train.crops_on: 'host' and 'device' as set; 'auto' on the
  devices when they are GPUs or TPUs, train.spatial_p is 0 and the canvases take at most
  train.crops_device_memory of the smallest device memory (the cases' shapes read from their
  shards' records, nothing opened), in every process (they must run the same programs)."""
  cfg = sampler.cfg
  setting = cfg.get('crops_on', 'host')
  if setting != 'auto':
    return setting == 'device', f'train.crops_on = {setting}'
  on, why = _auto(sampler, devices if devices is not None else jax.local_devices())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    votes = np.asarray(multihost_utils.process_allgather(np.int32(on)))
    if on and not votes.all():
      return False, f'auto: processes {np.flatnonzero(votes == 0).tolist()} cut on the host'
  return on, why


def _auto(sampler, devices) -> tuple:
  cfg = sampler.cfg
  platform = devices[0].platform
  if platform == 'cpu':
    return False, 'auto: CPU devices share the host\'s cores'
  if cfg.get('spatial_p', 0.0) > 0:
    return False, 'auto: train.spatial_p > 0 (rotated crops are cut on the host)'
  metas = sampler.image_records()
  need = canvas_bytes([m['shape'][:3] for m in metas], sampler.crop, sampler.num_channels,
                      np.dtype(metas[0]['dtype']).itemsize, input_pipeline.batch_keys(cfg))
  limits = [(d.memory_stats() or {}).get('bytes_limit', 0) for d in devices]
  budget = cfg.get('crops_device_memory', 0.25) * min(limits)
  if need > budget:
    return False, (f'auto: the cases need {need / 1e9:.2f} GB a device, over '
                   f'train.crops_device_memory ({budget / 1e9:.2f} GB)')
  return True, f'auto: {platform}, the cases need {need / 1e9:.2f} GB a device'


def cut_row(arrays: dict, case, corner, flip, scale, shift, weight, *, crop, keys):
  """One slot's crop from the canvases: {key: [X, Y, Z(, C)]} for `keys` (batch_keys), the
  arithmetic of CropSampler.example's unrotated path: the block at `corner` of case `case`,
  flipped on the axes where flip is True, the image jittered (x * scale + shift per channel) and 0
  where the brain mask is 0, label_weight (1 where the case has no voxel weights) times `weight`.

  arrays: image f32 or f16[N, L, C], p u8[N, L], brain u8[N, L] and, where present, posterior
  f32[N, L] and label_weight f32[N, L] (the case's voxel weights, 1 outside the case)."""
  def block(name):
    v = arrays[name]
    x = lax.dynamic_slice(v, (case, corner[0], corner[1], corner[2]) + (0,) * (v.ndim - 4),
                          (1,) + tuple(crop) + v.shape[4:])[0]
    for a in range(3):
      x = jnp.where(flip[a], jnp.flip(x, a), x)
    return x

  out = {'p': block('p'), 'brain': block('brain')}
  image = block('image').astype(jnp.float32)
  out['image'] = jnp.where(out['brain'][..., None] > 0, image * scale + shift, jnp.float32(0))
  if 'posterior' in keys:
    out['posterior'] = block('posterior')
  if 'label_weight' in keys:
    voxel = block('label_weight') if 'label_weight' in arrays else jnp.ones(crop, jnp.float32)
    out['label_weight'] = voxel * weight
  return {k: out[k] for k in keys}


@functools.lru_cache(maxsize=None)
def cut_fn(mesh, crop: tuple, keys: tuple):
  """The jitted cut of a global batch: (arrays, draws) -> {key: [B, X, Y, Z(, C)]} sharded along
  `data`, each device cutting its own rows from its replica of the canvases (shard_map)."""
  def local(arrays, draws):
    row = functools.partial(cut_row, arrays, crop=crop, keys=keys)
    return jax.vmap(row)(*(draws[k] for k in DRAW_FIELDS))

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P('data')),
                               out_specs=P('data'), check_vma=False))


class DeviceCrops:
  """The training cases of `sampler` on every device of `mesh`, and the batches cut there.

  batch(step) is distributed.global_batch(sampler.local_batch(step)) computed on the devices:
  the same arrays (the image to one float32 rounding of x * scale + shift), from this process's
  slots' draws only."""

  def __init__(self, sampler: input_pipeline.CropSampler, mesh, place: bool = True):
    """place=False: the canvas geometry only (from the shards' records), for timing `draws`;
    nothing opened or put on a device."""
    if sampler.cfg.get('spatial_p', 0.0) > 0:
      raise ValueError('train.crops_on = device cuts unrotated crops only: expected '
                       f'train.spatial_p = 0, got {sampler.cfg.spatial_p}')
    self.sampler, self.mesh = sampler, mesh
    self.crop, self.keys = sampler.crop, input_pipeline.batch_keys(sampler.cfg)
    self.shape, self.offsets = canvas([r['shape'][:3] for r in sampler.image_records()],
                                      self.crop)
    self._data = distributed.data_sharding(mesh)
    self._cut = cut_fn(mesh, self.crop, self.keys)
    self.arrays, self.nbytes = None, 0
    if not place:
      return
    t0 = time.time()
    # checksums, symmetry weights: the host path's own
    cases = [sampler.case(ci) for ci in range(len(sampler.case_ids))]
    host = self._canvases(cases)
    self.nbytes = sum(v.nbytes for v in host.values())
    rep = distributed.replicated(mesh)
    self.arrays = {k: jax.make_array_from_callback(v.shape, rep, lambda idx, v=v: v[idx])
                   for k, v in host.items()}
    logging.info('train: %d cases on each device (canvas %s, %.2f GB a device) in %.1fs; crops '
                 'cut there', len(cases), self.shape, self.nbytes / 1e9, time.time() - t0)

  def _canvases(self, cases) -> dict:
    lead = (len(cases),) + self.shape
    fields = canvas_fields(self.keys, self.sampler.num_channels, cases[0][0].dtype,
                           any(case[5] is not None for case in cases))
    # 0 outside the cases; voxel weights 1 there, as on the host
    out = {k: (np.ones if k == 'label_weight' else np.zeros)(lead + tail, dt)
           for k, (dt, tail) in fields.items()}
    for i, (image, p, brain, _, post, weight) in enumerate(cases):
      at = tuple(slice(o, o + s) for o, s in zip(self.offsets[i], image.shape[:3]))
      out['image'][(i,) + at] = image
      out['p'][(i,) + at] = p
      out['brain'][(i,) + at] = brain
      if 'posterior' in out:
        out['posterior'][(i,) + at] = post
      if 'label_weight' in out and weight is not None:
        out['label_weight'][(i,) + at] = weight
    return out

  def draws(self, step: int) -> dict:
    """This process's slots' draws for `step`: {name: np[B_local, ...]} (DRAW_FIELDS)."""
    s = self.sampler
    b, c = s.local_batch_size, s.num_channels
    out = {k: np.zeros((b,) + tail(c), dt) for k, (dt, tail) in DRAW_FIELDS.items()}
    for j in range(b):
      ci, start, axes, scale, shift, coords = s.draw(step, s.first_slot + j)
      assert coords is None  # spatial_p = 0 (checked at construction)
      out['case'][j] = ci
      out['corner'][j] = np.asarray(start) + self.offsets[ci]
      out['flip'][j] = [a in axes for a in range(3)]
      out['scale'][j], out['shift'][j] = scale, shift
      out['weight'][j] = s.case_weight(ci)
    return out

  def batch(self, step: int) -> dict:
    """The global batch of `step`, cut on the devices: {key: jax.Array[B, ...]} along `data`."""
    return self._cut(self.arrays, distributed.global_batch(self.draws(step), self._data))

  def iterate(self, start_step: int, end_step: int):
    """Yields (step, global batch) for start_step <= step < end_step. A host thread draws the next
    `train.prefetch` steps ahead (the train loop waits on each step's metrics, so draws made
    after that wait would leave the devices idle); the cut is dispatched asynchronously."""
    depth = max(1, self.sampler.cfg.prefetch)
    with cf.ThreadPoolExecutor(1) as ex:
      queue = collections.deque()
      for step in range(start_step, end_step):
        while len(queue) < depth and step + len(queue) < end_step:
          queue.append(ex.submit(self.draws, step + len(queue)))
        draws = queue.popleft().result()
        yield step, self._cut(self.arrays, distributed.global_batch(draws, self._data))
