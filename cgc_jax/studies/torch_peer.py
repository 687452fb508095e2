"""The PyTorch U-Net a user would write instead, for side-by-side timing in benchmark.py only.

Never imported by the product or its tests; needs `pip install torch` (CPU build is enough). Same
network as unet.UNet3D: (3x3x3 conv without bias, instance or group norm, ReLU) x 2 per level,
2x2x2 max-pool, 2x2x2 stride-2 transposed convolution, skip concatenation, 1x1x1 head; trained with
cross-entropy + soft Dice and AdamW on the same crop and batch; inference window by window with the
same Gaussian weights, overlap and flip TTA as sliding_window.Predictor.
"""
import itertools
import os
import time

import numpy as np


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


def info() -> tuple:
  """(torch version, intra-op threads) as the timings below see them."""
  torch = _torch()
  return torch.__version__, torch.get_num_threads()


def build(model_cfg, in_channels: int):
  """A torch.nn.Module mapping f32[B, C, X, Y, Z] -> logits f32[B, 2, X, Y, Z]."""
  torch = _torch()
  nn = torch.nn

  def norm(c):
    if model_cfg.norm == 'group':
      return nn.GroupNorm(min(model_cfg.groups, c), c)
    return nn.InstanceNorm3d(c, affine=True)

  def double(cin, cout):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(),
                         nn.Conv3d(cout, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU())

  class UNet(nn.Module):

    def __init__(self):
      super().__init__()
      widths = [model_cfg.base * 2**i for i in range(model_cfg.levels)]
      self.down = nn.ModuleList()
      cin = in_channels
      for w in widths:
        self.down.append(double(cin, w))
        cin = w
      self.up = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2)
                              for i in range(model_cfg.levels - 1))
      self.dec = nn.ModuleList(
          double(2 * widths[i], widths[i]) for i in range(model_cfg.levels - 1))
      self.head = nn.Conv3d(widths[0], 2, 1)

    def forward(self, x):
      skips = []
      for i, block in enumerate(self.down):
        x = block(x)
        if i < len(self.down) - 1:
          skips.append(x)
          x = torch.nn.functional.max_pool3d(x, 2)
      for i in reversed(range(len(self.up))):
        x = self.dec[i](torch.cat([self.up[i](x), skips[i]], 1))
      return self.head(x)

  return UNet()


def time_train_step(config, in_channels: int, steps: int) -> float:
  """Seconds per optimiser step (after one warm-up step) on random data of the config's
  crop/batch."""
  torch = _torch()
  t = config.train
  model = build(config.model, in_channels)
  opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
  g = torch.Generator().manual_seed(0)
  x = torch.randn((t.batch_size, in_channels) + tuple(t.crop), generator=g)
  y = torch.zeros((t.batch_size,) + tuple(t.crop), dtype=torch.long)
  c = t.crop
  y[:, c[0] // 4:c[0] // 2, c[1] // 4:c[1] // 2] = 1

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    prob = torch.softmax(logits, 1)[:, 1]
    inter = (prob * y).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    loss = torch.nn.functional.cross_entropy(logits, y) + dice.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    return loss

  step()
  t0 = time.time()
  for _ in range(steps):
    step()
  return (time.time() - t0) / steps


def predict_volume(model, image, window, overlap: float, gauss, batch: int, tta: bool):
  """image f32[X, Y, Z, C] (X, Y, Z >= window) -> lesion probability f32[X, Y, Z]."""
  torch = _torch()
  # pylint: disable-next=g-import-not-at-top
  from cgc_jax.inference import sliding_window  # NumPy parts only
  size = image.shape[:3]
  vol = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))
  acc = torch.zeros(size)
  wsum = torch.zeros(size)
  g = torch.from_numpy(gauss)
  starts = list(itertools.product(*sliding_window.compute_steps(size, window, overlap)))
  flips = [f for r in range(4) for f in itertools.combinations((2, 3, 4), r)] if tta else [()]
  with torch.inference_mode():
    for i in range(0, len(starts), batch):
      chunk = starts[i:i + batch]
      wins = torch.stack([vol[(slice(None),) + tuple(slice(s, s + w) for s, w in zip(st, window))]
                          for st in chunk])
      prob = 0
      for f in flips:
        x = torch.flip(wins, f) if f else wins
        p = torch.softmax(model(x), 1)[:, 1:2]
        prob = prob + (torch.flip(p, f) if f else p)
      prob = prob[:, 0] / len(flips)
      for st, pw in zip(chunk, prob):
        sl = tuple(slice(s, s + w) for s, w in zip(st, window))
        acc[sl] += pw * g
        wsum[sl] += g
  return (acc / wsum).numpy()


def time_inference(config, in_channels: int, shape, window, overlap: float, gauss, batch: int,
                   tta: bool) -> float:
  """Seconds for one sliding-window pass over a random volume of `shape` (after a warm-up pass)."""
  _torch()
  model = build(config.model, in_channels).eval()
  size = tuple(max(s, w) for s, w in zip(shape, window))
  image = np.random.default_rng(0).normal(size=size + (in_channels,)).astype(np.float32)
  predict_volume(model, image[:window[0], :window[1], :window[2]], window, overlap, gauss, batch,
                 False)  # warm-up: one window
  t0 = time.time()
  predict_volume(model, image, window, overlap, gauss, batch, tta)
  return time.time() - t0
