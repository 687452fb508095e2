import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from cgc_jax.inference import sliding_window
from cgc_jax.model import train_state
from cgc_jax.model import unet

from conftest import tiny_config


def _params(cfg, seed):
  """U-Net parameters, initialised in one jitted call (eager init runs op by op: ~20 s on CPU)."""
  init = jax.jit(lambda k: train_state.init_params(cfg, k, 4)['unet'])
  return init(jax.random.key(seed, impl='rbg'))


def test_compute_steps_hand_values():
  # nnU-Net's rule: ceil((size - window) / (window * (1 - overlap))) + 1 evenly spread starts
  assert sliding_window.compute_steps((100, 64, 30), (64, 64, 64), 0.5) == [[0, 18, 36], [0], [0]]
  assert sliding_window.compute_steps((65,), (32,), 0.5) == [[0, 11, 22, 33]]


def test_gaussian_importance():
  g = sliding_window.gaussian_importance((8, 10, 6), 0.125)
  assert g.shape == (8, 10, 6) and g.max() == 1.0 and g.min() > 0
  assert g[4, 5, 3] == 1.0 and g[0, 0, 0] < 0.01


@pytest.mark.parametrize('shape', [(16, 16, 16), (11, 20, 9)])
def test_predict_volume_matches_direct_softmax(shape):
  cfg = tiny_config()
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  params = _params(cfg, 0)
  pred = sliding_window.Predictor(cfg, mesh)
  rng = np.random.default_rng(0)
  image = rng.normal(size=shape + (4,)).astype(np.float32)
  prob = pred.predict_volume(params, image)
  assert prob.shape == shape and prob.dtype == np.float32
  net, _, _ = unet.build(cfg.model)
  if shape == (16, 16, 16):  # one window: the Gaussian weights cancel
    logits, _ = net.apply({'params': params}, image[None])
    want = np.asarray(jax.nn.softmax(logits, -1)[0, ..., 1])
    np.testing.assert_allclose(prob, want, atol=1e-5)
  else:  # smaller than the window on two axes: padded, predicted, cropped back
    pads = [((16 - s) // 2 if s < 16 else 0) for s in shape]
    big = np.zeros((16, 20, 16, 4), np.float32)
    big[pads[0]:pads[0] + shape[0], :, pads[2]:pads[2] + shape[2]] = image
    starts = sliding_window.compute_steps((16, 20, 16), (16, 16, 16), 0.5)
    assert starts == [[0], [0, 4], [0]]
    g = sliding_window.gaussian_importance((16, 16, 16), 0.125)
    acc, w = np.zeros((16, 20, 16)), np.zeros((16, 20, 16))
    for y0 in (0, 4):
      logits, _ = net.apply({'params': params}, big[None, :, y0:y0 + 16])
      acc[:, y0:y0 + 16] += np.asarray(jax.nn.softmax(logits, -1)[0, ..., 1]) * g
      w[:, y0:y0 + 16] += g
    want = (acc / w)[pads[0]:pads[0] + shape[0], :, pads[2]:pads[2] + shape[2]]
    np.testing.assert_allclose(prob, want, atol=1e-5)


def test_flip_tta_is_flip_equivariant():
  cfg = tiny_config(**{'eval.tta_flip': True})
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  params = _params(cfg, 1)
  pred = sliding_window.Predictor(cfg, mesh)
  image = np.random.default_rng(1).normal(size=(16, 16, 16, 4)).astype(np.float32)
  a = pred.predict_volume(params, image)
  b = pred.predict_volume(params, image[::-1, :, ::-1].copy())[::-1, :, ::-1]
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_flip_tta_equals_mean_over_the_eight_flips():
  import itertools  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(**{'eval.tta_flip': True})
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  params = _params(cfg, 2)
  image = np.random.default_rng(2).normal(size=(16, 16, 16, 4)).astype(np.float32)
  got = sliding_window.Predictor(cfg, mesh).predict_volume(params, image)
  net, _, _ = unet.build(cfg.model)
  want = np.zeros((16, 16, 16))
  for r in range(4):
    for axes in itertools.combinations((0, 1, 2), r):
      x = np.flip(image, axes) if axes else image
      logits, _ = net.apply({'params': params}, x[None].copy())
      p = np.asarray(jax.nn.softmax(logits, -1)[0, ..., 1])
      want += np.flip(p, axes) if axes else p
  np.testing.assert_allclose(got, want / 8, atol=1e-5)


def test_long_volumes_log_progress_with_rate_and_eta(monkeypatch):
  cfg = tiny_config(**{'eval.batch_size': 8})
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  params = _params(cfg, 0)
  pred = sliding_window.Predictor(cfg, mesh)
  image = np.zeros((40, 16, 16, 4), np.float32)  # 7 windows along x: one batch of 8 rows
  lines = []
  monkeypatch.setattr(sliding_window.logging, 'info', lambda fmt, *a: lines.append(fmt % a))
  pred.progress_every_s = 1e-9  # every batch but the last
  big = np.zeros((16, 16, 160, 4), np.float32)  # 19 windows along z: batches of 8, 8, 3
  want = pred.predict_volume(params, big)
  assert len(lines) == 2 and lines[0].startswith('sliding window: 8/19 windows (')
  assert 'windows/s, ETA' in lines[0] and lines[1].startswith('sliding window: 16/19 windows (')
  pred.progress_every_s = 0.0  # off: same numbers, no lines
  np.testing.assert_array_equal(pred.predict_volume(params, big), want)
  pred.predict_volume(params, image)
  assert len(lines) == 2
