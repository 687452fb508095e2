"""Training crops from the prepared and pseudo-label shards.

The batch of global step s is a pure function of (train.seed, s): slot j of the global batch draws
sample g = s * B + j from an epoch-wise seeded permutation of the cases, and its crop position,
foreground choice, flips, intensity jitter and (train.spatial_p) rotation and zoom from
`default_rng([seed, s, j])`. So the iterator's whole state is the next step number (saved in every
checkpoint), resume is exact, and the batch does not depend on how many processes or threads build
it. Each process builds only its own slots
[process_index * B_local, (process_index + 1) * B_local) and opens only the cases those slots draw
(on first use); crops read the memory-mapped shards, so a crop reads about the crop only. Host
threads build the next `prefetch` batches ahead.

Example contract (one slot): image f32[X, Y, Z, C], p f32[X, Y, Z] (P in {0, 1}),
brain f32[X, Y, Z], posterior f32[X, Y, Z] (P's soft posterior) when train.confidence_gamma > 0,
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


def batch_shapes(train_cfg, num_channels: int) -> dict:
  """{key: shape} of a global batch (train.batch_size crops; every array float32)."""
  lead = (int(train_cfg.batch_size),) + tuple(int(c) for c in train_cfg.crop)
  return {k: lead + (num_channels,) if k == 'image' else lead for k in batch_keys(train_cfg)}


def synthetic_batch(train_cfg, num_channels: int, rng: np.random.Generator) -> dict:
  """A batch of batch_shapes(...) with batch_keys(train_cfg)'s arrays, for timing the step without
  data: image N(0, 1); P a box over the first quarter of the crop's first two axes (so the CGC
  terms see lesion and normal cells); brain and label_weight 1, posterior = P."""
  shapes = batch_shapes(train_cfg, num_channels)
  p = np.zeros(shapes['p'], np.float32)
  x, y = p.shape[1], p.shape[2]
  p[:, x // 4: x // 2, y // 4: y // 2] = 1
  make = {'image': lambda s: rng.normal(size=s).astype(np.float32), 'p': lambda s: p,
          'posterior': lambda s: p.copy(), 'brain': lambda s: np.ones(s, np.float32),
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

  def example(self, step: int, slot: int) -> dict:
    cfg = self.cfg
    ci = self._case_of(step * cfg.batch_size + slot)
    rng = np.random.default_rng([cfg.seed, 2, step, slot])
    image, p, brain, fg, post, weight = self._case(ci)
    shape = image.shape[:3]
    lo = [min(0, s - c) for s, c in zip(shape, self.crop)]
    hi = [max(0, s - c) for s, c in zip(shape, self.crop)]
    use_fg = rng.random() < cfg.fg_fraction and len(fg) > 0
    if use_fg:
      centre = fg[rng.integers(len(fg))]
      start = [int(np.clip(c - k // 2, a, b)) for c, k, a, b in zip(centre, self.crop, lo, hi)]
    else:
      start = [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
    src = tuple(slice(max(s, 0), min(s + k, n)) for s, k, n in zip(start, self.crop, shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    out_img = np.zeros(self.crop + (image.shape[-1],), np.float32)
    out_p = np.zeros(self.crop, np.float32)
    out_b = np.zeros(self.crop, np.float32)
    out_img[dst] = image[src]
    out_p[dst] = p[src]
    out_b[dst] = brain[src]
    # name -> (volume, interpolation order, value outside the scan, where the brain weight is 0
    # anyway)
    sources = {}
    if post is not None:  # posterior 0 outside: a sure "normal"
      sources['posterior'] = (post, 1, 0.0)
    if weight is not None:
      sources['label_weight'] = (weight, 0, 1.0)
    extra = {}
    for k, (vol, _, outside) in sources.items():
      extra[k] = np.full(self.crop, outside, np.float32)
      extra[k][dst] = vol[src]
    flips = rng.random(3) < 0.5
    c = out_img.shape[-1]
    scale = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, c).astype(np.float32)
    shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, c).astype(np.float32)
    spatial_p = cfg.get('spatial_p', 0.0)
    if spatial_p > 0 and rng.random() < spatial_p:  # drawn last: the stream above is unchanged
      coords = spatial_coords(self.crop, start, self._spacing(ci), rng, cfg.rotate_deg, cfg.zoom)
      out_img = np.stack([resample(image, coords, 1, channel=k) for k in range(c)], -1)
      out_p = resample(p, coords, 0)
      out_b = resample(brain, coords, 0)
      extra = {k: resample(vol, coords, order) for k, (vol, order, _) in sources.items()}
    out_img = np.where(out_b[..., None] > 0, out_img * scale + shift, 0.0).astype(np.float32)
    if cfg.flip:
      axes = tuple(int(a) for a in np.nonzero(flips)[0])
      if axes:
        out_img = np.flip(out_img, axes)
        out_p = np.flip(out_p, axes)
        out_b = np.flip(out_b, axes)
        extra = {k: np.flip(v, axes) for k, v in extra.items()}
    if self._case_weights or self._weighted:  # the case's weight over the whole crop
      w = np.float32(self._case_weights.get(self.case_ids[ci], 1.0))
      extra['label_weight'] = extra.get('label_weight', np.ones(self.crop, np.float32)) * w
    out = {'image': out_img, 'p': out_p, 'brain': out_b, **extra}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}

  def local_batch(self, step: int) -> dict:
    """This process's slots of the global batch of `step`, stacked: image f32[B_local, ...]."""
    exs = [self.example(step, self.first_slot + j) for j in range(self.local_batch_size)]
    return {k: np.stack([e[k] for e in exs]) for k in exs[0]}

  def case_ids_of(self, step: int) -> list:
    """Case ids in the global batch of `step` (for error messages)."""
    return [self.case_ids[self._case_of(step * self.cfg.batch_size + j)]
            for j in range(self.cfg.batch_size)]

  def iterate(self, start_step: int, end_step: int):
    """Yields (step, local_batch) for start_step <= step < end_step, prefetching with threads."""
    workers = max(1, self.cfg.num_workers)
    depth = max(1, self.cfg.prefetch)
    with cf.ThreadPoolExecutor(workers) as ex:
      queue = collections.deque()
      nxt = start_step
      while nxt < end_step and len(queue) < depth:
        queue.append((nxt, ex.submit(self.local_batch, nxt)))
        nxt += 1
      while queue:
        step, fut = queue.popleft()
        if nxt < end_step:
          queue.append((nxt, ex.submit(self.local_batch, nxt)))
          nxt += 1
        yield step, fut.result()
