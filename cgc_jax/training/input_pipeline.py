"""Training crops from the prepared and pseudo-label shards.

The batch of global step s is a pure function of (train.seed, s): slot j of the global batch draws
sample g = s * B + j from an epoch-wise seeded permutation of the cases, and its crop position,
foreground choice, flips, intensity jitter and (train.spatial_p) rotation and zoom from
`default_rng([seed, s, j])`. So the iterator's whole state is the next step number (saved in every
checkpoint), resume is exact, and the batch does not depend on how many processes or threads build
it. Each process builds only its own slots
[process_index * B_local, (process_index + 1) * B_local) and opens only the cases those slots draw
(on first use); crops read the memory-mapped shards, so a crop reads about the crop only.
`train.num_workers` host threads make the crops of the next `train.prefetch` batches, a crop per
task.

Example contract (one slot): image f32[X, Y, Z, C], p u8[X, Y, Z] (P in {0, 1}),
brain u8[X, Y, Z] (the train step reads both as float32; a quarter of the bytes to write and to
send to the devices), posterior f32[X, Y, Z] (P's soft posterior) when train.confidence_gamma > 0,
and label_weight f32[X, Y, Z] (0 on P's left-right symmetric voxels) when train.symmetry_margin > 0,
times the case's weight (labels.quality.case_weights) when train.quality_weight > 0 or
train.ensemble_guide = 'cases', and 0 where network 0's mask and P disagree (training/guide.py)
when train.ensemble_guide = 'voxels';
(X, Y, Z) = train.crop. Cases smaller than the crop are zero-padded (brain 0).
"""
import collections
import concurrent.futures as cf
import threading

import numpy as np

from cgc_jax.core import store as store_lib
from cgc_jax.imaging import morphology
from cgc_jax.training import guide as guide_lib

_MAX_FG_COORDS = 50000  # lesion voxel coordinates cached per case for foreground sampling


def batch_keys(train_cfg) -> tuple:
  """The arrays of a batch under this train config (the example contract above): what the train
  step reads, so anything that builds a batch (this sampler, a benchmark, an export) builds
  these."""
  return ('image', 'p', 'brain') + (('posterior',) if train_cfg.confidence_gamma else ()) + (
      ('label_weight',) if train_cfg.get('symmetry_margin', 0.0) > 0 or
      train_cfg.get('quality_weight', 0.0) > 0 or
      train_cfg.get('ensemble_guide', 'none') != 'none' else ())


def batch_dtype(key: str):
  """The host dtype of a batch array: P and the brain mask (0 or 1) as uint8, the rest float32."""
  return np.uint8 if key in ('p', 'brain') else np.float32


def batch_shapes(train_cfg, num_channels: int) -> dict:
  """{key: shape} of a global batch (train.batch_size crops; dtypes: batch_dtype)."""
  lead = (int(train_cfg.batch_size),) + tuple(int(c) for c in train_cfg.crop)
  return {k: lead + (num_channels,) if k == 'image' else lead for k in batch_keys(train_cfg)}


def synthetic_batch(train_cfg, num_channels: int, rng: np.random.Generator) -> dict:
  """A batch of batch_shapes(...) with batch_keys(train_cfg)'s arrays, for timing the step without
  data: image N(0, 1); P a box over the first quarter of the crop's first two axes (so the CGC
  terms see lesion and normal cells); brain and label_weight 1, posterior = P."""
  shapes = batch_shapes(train_cfg, num_channels)
  p = np.zeros(shapes['p'], np.uint8)
  x, y = p.shape[1], p.shape[2]
  p[:, x // 4: x // 2, y // 4: y // 2] = 1
  make = {'image': lambda s: rng.normal(size=s).astype(np.float32), 'p': lambda s: p,
          'posterior': lambda s: p.astype(np.float32), 'brain': lambda s: np.ones(s, np.uint8),
          'label_weight': lambda s: np.ones(s, np.float32)}
  return {k: make[k](s) for k, s in shapes.items()}


def spatial_coords(crop, start, spacing, rng, rotate_deg: float, zoom) -> np.ndarray:
  """Source voxel coordinates f32[3, X, Y, Z] of a rotated and zoomed crop: the crop's voxel x is
  read at c + A (x - k), k the crop's centre, c = start + k the same point of the unaugmented crop,
  and A = S^-1 R S / z in voxels (S = diag(spacing): the rotation is rigid in mm), R rotating by
  angles drawn uniformly in +-rotate_deg about each axis, z drawn uniformly in `zoom` (z > 1
  magnifies). Draws 4 numbers from `rng`."""
  angles = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg, 3))
  z = rng.uniform(zoom[0], zoom[1])
  r = np.eye(3)
  for axis, a in enumerate(angles):
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i] = m[j, j] = np.cos(a)
    m[i, j], m[j, i] = -np.sin(a), np.sin(a)
    r = m @ r
  sp = np.asarray(spacing, np.float64)
  a = (r * sp[None, :] / sp[:, None]) / z  # S^-1 R S / z
  k = (np.asarray(crop, np.float64) - 1) / 2
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) - kk for n, kk in zip(crop, k)],
                              indexing='ij'))
  centre = np.asarray(start, np.float64) + k
  return (np.tensordot(a, grid, 1) + centre[:, None, None, None]).astype(np.float32)


def resample(array, coords: np.ndarray, order: int, channel=None) -> np.ndarray:
  """array (memory-mapped [X, Y, Z] or [X, Y, Z, C] with `channel`) read at coords f32[3, ...]:
  linear (order 1) or nearest (order 0), 0 outside the array. Reads only the block the coords
  cover."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  shape = array.shape[:3]
  lo = np.clip(np.floor(coords.reshape(3, -1).min(1)).astype(int) - 1, 0, None)
  hi = np.minimum(np.ceil(coords.reshape(3, -1).max(1)).astype(int) + 2, shape)
  if np.any(hi <= lo):
    return np.zeros(coords.shape[1:], np.float32)
  block = tuple(slice(a, b) for a, b in zip(lo, hi))
  src = array[block + ((channel,) if channel is not None else ())]
  local = coords - lo.reshape(3, 1, 1, 1).astype(np.float32)
  return ndimage.map_coordinates(np.asarray(src, np.float32), local, order=order,
                                 mode='constant', cval=0.0).astype(np.float32)


class CropSampler:
  """Deterministic random crops; see module docstring."""

  def __init__(self, prep: store_lib.Store, labels: store_lib.Store, case_ids: list, train_cfg,
               verify: bool = True, process_index: int = 0, process_count: int = 1,
               case_weights=None, guide_masks=None):
    if not case_ids:
      raise ValueError('no training cases')
    if train_cfg.batch_size % process_count:
      raise ValueError(f'train.batch_size {train_cfg.batch_size} is not divisible by the '
                       f'{process_count} processes')
    self.cfg = train_cfg
    self.case_ids = sorted(case_ids)
    self.crop = tuple(int(c) for c in train_cfg.crop)
    self.local_batch_size = train_cfg.batch_size // process_count
    self.first_slot = process_index * self.local_batch_size
    self._prep, self._labels, self._verify = prep, labels, verify
    # case -> its loss weight (train.quality_weight, train.ensemble_guide = 'cases')
    self._case_weights = case_weights or {}
    self._guide = guide_masks or {}  # case -> network 0's mask (train.ensemble_guide = 'voxels')
    self._weighted = 'label_weight' in batch_keys(train_cfg)  # every crop carries a weight
    self._cases = {}  # case index -> (image, p, brain, fg coords), opened on first use
    self._lock = threading.Lock()
    self._perm_cache = {}
    self._spacings = {}  # case index -> voxel size in mm (rotation and zoom only)
    self.num_channels = prep.meta(self.case_ids[0])['arrays']['image']['shape'][-1]

  def open_cases(self):
    """Opens every case now (what the first draw of each would do): for timing crops alone."""
    for ci in range(len(self.case_ids)):
      self._case(ci)

  def _case(self, ci: int):
    """Opens case `ci` (memory-mapped, checksums verified once) the first time a slot draws it."""
    with self._lock:
      if ci not in self._cases:
        cid = self.case_ids[ci]
        image = self._prep.read(cid, 'image', self._verify)
        brain = self._prep.read(cid, 'brain', self._verify)
        p = self._labels.read(cid, 'p', self._verify)
        post = (self._labels.read(cid, 'posterior', self._verify)
                if self.cfg.confidence_gamma else None)
        weight = None
        if self.cfg.get('symmetry_margin', 0.0) > 0:
          weight = self._label_weight(cid, image, p, brain)
        if cid in self._guide:  # 0 where network 0 and P disagree
          agree = guide_lib.voxel_weight(self._guide[cid], p)
          weight = agree if weight is None else weight * agree
        coords = np.argwhere(np.asarray(p) > 0)
        if len(coords) > _MAX_FG_COORDS:
          rng = np.random.default_rng([self.cfg.seed, len(coords)])
          coords = coords[np.sort(rng.choice(len(coords), _MAX_FG_COORDS, replace=False))]
        self._cases[ci] = (image, p, brain, coords.astype(np.int32), post, weight)
      return self._cases[ci]

  def case(self, ci: int):
    """Case `ci`'s (image, p, brain, foreground coords, posterior or None, voxel weight or None),
    opened on first use."""
    return self._case(ci)

  def image_records(self) -> list:
    """Every case's image record from its shard's meta ({'shape': [X, Y, Z, C], 'dtype': ...}),
    in case order; nothing opened."""
    return [self._prep.meta(c)['arrays']['image'] for c in self.case_ids]

  def case_weight(self, ci: int) -> float:
    """Case `ci`'s loss weight (train.quality_weight, train.ensemble_guide = 'cases'; else 1)."""
    return float(self._case_weights.get(self.case_ids[ci], 1.0))

  def _label_weight(self, cid, image, p, brain) -> np.ndarray:
    """f32[X, Y, Z]: 0 on P's left-right symmetric voxels (morphology.case_symmetric_lesion), 1
    elsewhere."""
    sym = morphology.case_symmetric_lesion(cid, p, image, brain, self._prep.meta(cid)['modalities'],
                                           self.cfg)
    return (~sym).astype(np.float32)

  def _spacing(self, ci: int) -> tuple:
    """Case `ci`'s voxel size in mm, read from its meta once (benign race: the value is fixed)."""
    if ci not in self._spacings:
      self._spacings[ci] = tuple(self._prep.meta(self.case_ids[ci])['geometry']['spacing'])
    return self._spacings[ci]

  def _case_of(self, g: int) -> int:
    n = len(self.case_ids)
    epoch = g // n
    perm = self._perm_cache.get(epoch)
    if perm is None:  # benign race between threads: the value is deterministic
      perm = np.random.default_rng([self.cfg.seed, 1, epoch]).permutation(n)
      self._perm_cache = {epoch: perm}
    return int(perm[g % n])

  def draw(self, step: int, slot: int):
    """Slot `slot` of step `step`'s random choices, in their fixed order: (case index, crop start,
    flipped axes, per-channel scale and shift, source coords f32[3, X, Y, Z] or None)."""
    cfg = self.cfg
    ci = self._case_of(step * cfg.batch_size + slot)
    rng = np.random.default_rng([cfg.seed, 2, step, slot])
    case = self._case(ci)
    image, fg = case[0], case[3]
    shape = image.shape[:3]
    lo = [min(0, s - c) for s, c in zip(shape, self.crop)]
    hi = [max(0, s - c) for s, c in zip(shape, self.crop)]
    if rng.random() < cfg.fg_fraction and len(fg) > 0:
      centre = fg[rng.integers(len(fg))]
      start = [int(np.clip(c - k // 2, a, b)) for c, k, a, b in zip(centre, self.crop, lo, hi)]
    else:
      start = [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
    flips = rng.random(3) < 0.5
    c = image.shape[-1]
    scale = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, c).astype(np.float32)
    shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, c).astype(np.float32)
    coords = None
    spatial_p = cfg.get('spatial_p', 0.0)
    if spatial_p > 0 and rng.random() < spatial_p:  # drawn last: the stream above is unchanged
      coords = spatial_coords(self.crop, start, self._spacing(ci), rng, cfg.rotate_deg, cfg.zoom)
    axes = tuple(int(a) for a in np.nonzero(flips)[0]) if cfg.flip else ()
    return ci, start, axes, scale, shift, coords

  def example(self, step: int, slot: int, out: dict = None) -> dict:
    """One slot's crop (the contract above), written into `out` ({key: array of the crop's shape
    and batch_dtype(key)}, e.g. rows of the batch; zero-filled where given) or into new arrays.

    Each array is written once, through a flipped view of its destination, after the intensity
    jitter on a buffer laid out for numpy's loops: about 4x fewer host cycles a crop than cutting,
    jittering and flipping whole arrays."""
    ci, start, axes, scale, shift, coords = self.draw(step, slot)
    image, p, brain, _, post, weight = self._case(ci)
    c = image.shape[-1]
    keys = batch_keys(self.cfg)
    if out is None:
      out = {k: np.zeros(self.crop + ((c,) if k == 'image' else ()), batch_dtype(k)) for k in keys}
    flip = tuple(slice(None, None, -1) if a in axes else slice(None) for a in range(3))
    view = {k: v[flip] for k, v in out.items()}  # writing here is writing the flipped crop
    # name -> (volume, interpolation order, value outside the scan, where the brain weight is 0
    # anyway)
    sources = {}
    if post is not None:  # posterior 0 outside: a sure "normal"
      sources['posterior'] = (post, 1, 0.0)
    if weight is not None:
      sources['label_weight'] = (weight, 0, 1.0)
    if coords is None:
      shape = image.shape[:3]
      src = tuple(slice(max(s, 0), min(s + k, n)) for s, k, n in zip(start, self.crop, shape))
      dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
      view['p'][dst] = p[src]
      view['brain'][dst] = brain[src]
      for k, (vol, _, outside) in sources.items():
        view[k][...] = outside
        view[k][dst] = vol[src]
      # the jitter on the block with its last two axes as one (z, channel) axis: numpy's loops
      # then run along rows of z x c values rather than c (several times slower); the padding
      # stays 0, outside the brain
      block = np.asarray(image[src])
      rows = block.reshape(block.shape[:2] + (-1,))
      jittered = np.multiply(rows, np.tile(scale, block.shape[2]))
      np.add(jittered, np.tile(shift, block.shape[2]), out=jittered)
      np.copyto(jittered, 0.0, where=np.repeat(view['brain'][dst] <= 0, c, axis=-1))
      view['image'][dst] = jittered.reshape(block.shape)
    else:
      dst = (slice(None),) * 3
      view['p'][...] = resample(p, coords, 0)
      view['brain'][...] = resample(brain, coords, 0)
      for k, (vol, order, _) in sources.items():
        view[k][...] = resample(vol, coords, order)
      # the jitter channel by channel on a contiguous buffer, 0 outside the brain
      off_brain = view['brain'] <= 0
      jittered = np.empty((c,) + off_brain.shape, np.float32)
      for k in range(c):
        np.multiply(resample(image, coords, 1, channel=k), scale[k], out=jittered[k])
        np.add(jittered[k], shift[k], out=jittered[k])
        np.copyto(jittered[k], 0.0, where=off_brain)
      view['image'][...] = np.moveaxis(jittered, 0, -1)
    if 'label_weight' in keys and 'label_weight' not in sources:
      out['label_weight'][...] = 1.0
    if 'label_weight' in out:  # the case's weight over the whole crop
      out['label_weight'] *= np.float32(self.case_weight(ci))
    return out

  def _empty_batch(self) -> dict:
    b, c = self.local_batch_size, self.num_channels
    return {k: np.zeros((b,) + self.crop + ((c,) if k == 'image' else ()), batch_dtype(k))
            for k in batch_keys(self.cfg)}

  def local_batch(self, step: int) -> dict:
    """This process's slots of the global batch of `step`: image f32[B_local, ...], each slot's
    crop written straight into its row."""
    out = self._empty_batch()
    for j in range(self.local_batch_size):
      self.example(step, self.first_slot + j, {k: v[j] for k, v in out.items()})
    return out

  def case_ids_of(self, step: int) -> list:
    """Case ids in the global batch of `step` (for error messages)."""
    return [self.case_ids[self._case_of(step * self.cfg.batch_size + j)]
            for j in range(self.cfg.batch_size)]

  def iterate(self, start_step: int, end_step: int):
    """Yields (step, local_batch) for start_step <= step < end_step. `train.num_workers` threads
    make the crops of the next `train.prefetch` batches, one crop a task (so every thread helps
    with one batch, and an accelerator host can give the crops as many threads as it has cores);
    each crop is a function of (seed, step, slot) alone, so the batches are local_batch's."""
    workers = max(1, self.cfg.num_workers)
    depth = max(1, self.cfg.prefetch)

    def submit(step):
      out = self._empty_batch()
      return out, [ex.submit(self.example, step, self.first_slot + j,
                             {k: v[j] for k, v in out.items()})
                   for j in range(self.local_batch_size)]

    with cf.ThreadPoolExecutor(workers) as ex:
      queue = collections.deque()
      nxt = start_step
      while nxt < end_step and len(queue) < depth:
        queue.append((nxt, submit(nxt)))
        nxt += 1
      while queue:
        step, (out, futs) = queue.popleft()
        if nxt < end_step:
          queue.append((nxt, submit(nxt)))
          nxt += 1
        for f in futs:
          f.result()  # raises the crop's error, if any
        yield step, out
