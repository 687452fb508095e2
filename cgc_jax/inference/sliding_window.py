"""Sliding-window inference over whole volumes (nnU-Net style), batched and sharded over devices.

`predict_volume(image: f32[X, Y, Z, C]) -> f32[X, Y, Z]` lesion probability. With several processes,
each calls it on the same volume: the window batch is split over every device of every process and
the result gathered back to all of them. Windows overlap by
`overlap`; each window's softmax is weighted by a Gaussian importance map (sigma = window *
sigma_scale) and accumulated in float32; optional flip test-time augmentation averages the 8
axis-flip combinations inside the same jitted function. Volumes smaller than the window are padded
and cropped back.
"""
import functools
import itertools
import math
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from cgc_jax.model import unet
from cgc_jax.runtime import distributed


def compute_steps(size, window, overlap: float) -> list:
  """Window start indices per axis covering `size` with at least `overlap` between neighbours."""
  steps = []
  for s, w in zip(size, window):
    if s <= w:
      steps.append([0])
      continue
    target = w * (1.0 - overlap)
    n = int(math.ceil((s - w) / target)) + 1
    actual = (s - w) / (n - 1)
    steps.append([int(round(actual * i)) for i in range(n)])
  return steps


def gaussian_importance(window, sigma_scale: float) -> np.ndarray:
  """f32[window] Gaussian centred in the window, max 1, no zeros."""
  g = np.zeros(window, np.float32)
  g[tuple(w // 2 for w in window)] = 1.0
  g = ndimage.gaussian_filter(g, [w * sigma_scale for w in window], mode='constant', cval=0)
  g = g / g.max()
  g[g == 0] = g[g != 0].min()
  return g.astype(np.float32)


def _flip_where(x, flags):
  """Reverses spatial axes 1..3 of x where flags[i] (traced bools): a gather, its own inverse."""
  for i in range(3):
    n = x.shape[1 + i]
    idx = jnp.where(flags[i], jnp.arange(n - 1, -1, -1), jnp.arange(n))
    x = jnp.take(x, idx, axis=1 + i)
  return x


def _forward(params, windows, *, model_cfg, tta: bool, gauss):
  """Gaussian-weighted lesion probability of windows f32[B, X, Y, Z, C] -> f32[B, X, Y, Z].

  TTA runs the 8 axis-flip combinations as a scan: the network is traced once and only one pass's
  activations are live at a time (unrolled, XLA kept all 8 and ran out of memory on the brats
  config).
  """
  net, _, _ = unet.build(model_cfg)

  def prob(x):
    logits, _ = net.apply({'params': params}, x)
    return jax.nn.softmax(logits, axis=-1)[..., 1]
  if not tta:
    return prob(windows) * gauss
  combos = jnp.asarray(list(itertools.product((False, True), repeat=3)))

  def body(acc, flags):
    return acc + _flip_where(prob(_flip_where(windows, flags)), flags), None
  acc, _ = jax.lax.scan(body, jnp.zeros(windows.shape[:4], jnp.float32), combos)
  return acc / len(combos) * gauss


class Predictor:
  """Holds the jitted window function for one mesh, window and TTA setting."""

  def __init__(self, config, mesh, window=None):
    e = config.eval
    self.window = tuple(window or e.window or config.train.crop)
    self.overlap = e.overlap
    self.progress_every_s = e.get('progress_every_s', 0.0)  # 0: no progress lines
    self.mesh = mesh
    n = mesh.devices.size
    self.batch = int(math.ceil(max(e.batch_size, 1) / n) * n)
    per_process = self.batch // jax.process_count()
    self._local_rows = slice(jax.process_index() * per_process,
                             (jax.process_index() + 1) * per_process)
    gauss = jnp.asarray(gaussian_importance(self.window, e.sigma_scale))
    self.gauss = np.asarray(gauss)
    repl, data = distributed.replicated(mesh), distributed.data_sharding(mesh)
    self._fn = jax.jit(functools.partial(_forward,
                                         model_cfg=config.model,
                                         tta=e.tta_flip,
                                         gauss=gauss),
                       in_shardings=(repl, data),
                       out_shardings=data)
    if n > 1 and unet.resolve_conv_impl(config.model.conv_impl) == 'onednn':
      self._fn = distributed.OnMesh(self._fn, mesh)  # oneDNN per device on its rows

  def predict_volume(self, params, image: np.ndarray) -> np.ndarray:
    shape = image.shape[:3]
    pads = [(max(w - s, 0) // 2, max(w - s, 0) - max(w - s, 0) // 2)
            for s, w in zip(shape, self.window)]
    img = np.pad(np.asarray(image, np.float32), pads + [(0, 0)])
    size = img.shape[:3]
    acc = np.zeros(size, np.float32)
    wsum = np.zeros(size, np.float32)
    starts = list(itertools.product(*compute_steps(size, self.window, self.overlap)))
    sharding = distributed.data_sharding(self.mesh)
    t0 = t_last = time.time()
    for i in range(0, len(starts), self.batch):
      chunk = starts[i:i + self.batch]
      wins = np.stack(
          [img[tuple(slice(s, s + w) for s, w in zip(st, self.window))] for st in chunk])
      if len(chunk) < self.batch:  # pad the last batch to the device multiple
        wins = np.concatenate([wins, np.repeat(wins[-1:], self.batch - len(chunk), 0)])
      # every process holds the whole volume and feeds its own devices' rows of the window batch
      local = wins[self._local_rows]
      out = distributed.gather(self._fn(params, jax.make_array_from_process_local_data(sharding,
                                                                                     local)))
      for st, pw in zip(chunk, out):
        sl = tuple(slice(s, s + w) for s, w in zip(st, self.window))
        acc[sl] += pw
        wsum[sl] += self.gauss
      now, done = time.time(), min(i + self.batch, len(starts))
      if self.progress_every_s and now - t_last >= self.progress_every_s and done < len(starts):
        t_last = now
        rate = done / (now - t0)
        logging.info('sliding window: %d/%d windows (%.2f windows/s, ETA %.0fs)', done, len(starts),
                     rate, (len(starts) - done) / rate)
    prob = acc / wsum
    return prob[tuple(slice(a, a + s) for (a, _), s in zip(pads, shape))]
