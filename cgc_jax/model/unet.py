"""Flax Linen 3D U-Net backbone and the CGC heads.

Array contract: `UNet3D(image: f[B, X, Y, Z, C]) -> (logits f32[B, X, Y, Z, 2],
bottleneck f32[B, X/s, Y/s, Z/s, base * 2**(levels-1)])` with s = 2**(levels-1); X, Y, Z divisible
by s. Compute runs in `dtype` (bfloat16 on accelerators), parameters are float32. Norms are
batch-independent (instance or group), so data parallelism needs no cross-device statistics.
"""
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cgc_jax import errors
from cgc_jax.model import onednn


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> on CPU 'onednn' when it is available (onednn.py: oneDNN's convolution, 3-5x faster
  than `sum2d` forward + backward, benchmark.py), else 'sum2d' (XLA's CPU 2D convolution is 4-6x
  faster than its 3D one at these channel counts); 'native' elsewhere (cuDNN / TPU handle 3D
  well). 'onednn' asked for by name raises errors.ConfigError when unavailable.
  On several devices the oneDNN call runs per device on its own rows of the batch (conv3x3x3 under
  a context mesh: the train step and the sliding window set it); XLA alone cannot split a foreign
  call along the batch."""
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'native'
    return 'onednn' if onednn.available() else 'sum2d'
  if impl not in ('sum2d', 'native', 'onednn'):
    raise ValueError(f'unknown model.conv_impl {impl!r} (auto | sum2d | native | onednn)')
  if impl == 'onednn' and not onednn.available():
    raise errors.ConfigError(f'config: model.conv_impl=onednn: {onednn.reason()} (auto falls back '
                             'to XLA\'s own convolutions)')
  return impl


_LOGGED = set()  # the choices chosen_conv_impl has logged in this process


def chosen_conv_impl(impl: str) -> str:
  """resolve_conv_impl(impl) for the current backend and device count, logged the first time each
  choice is made: build() calls it, so the modules get a concrete implementation, not 'auto'."""
  out = resolve_conv_impl(impl)
  key = (impl, out, jax.default_backend(), jax.device_count())
  if key not in _LOGGED:
    _LOGGED.add(key)
    logging.info('model.conv_impl=%s: the 3x3x3 convolutions run as %s (%s, %d device(s))', *key)
  return out


def conv3x3x3(x, kernel, impl: str):
  """'SAME' 3x3x3 convolution. x: [B, X, Y, Z, Cin], kernel: [3, 3, 3, Cin, Cout].

  sum2d: three 2D convolutions over (Y, Z) with X folded into the batch, one per kernel slice along
  X, summed: the same arithmetic as the 3D convolution. onednn: oneDNN's (onednn.conv3d) in
  float32; other dtypes take `sum2d`.
  """
  if impl == 'onednn':
    if x.dtype == jnp.float32 and kernel.dtype == jnp.float32:
      mesh = jax.sharding.get_abstract_mesh()
      if not mesh.empty and mesh.size > 1 and 'data' in mesh.axis_names:
        # each device convolves its own rows of the batch; the kernel's gradient is summed
        # across devices by shard_map's transpose
        return jax.shard_map(onednn.conv3d, in_specs=(P('data'), P()), out_specs=P('data'),
                             check_vma=False)(x, kernel)
      return onednn.conv3d(x, kernel)
    impl = 'sum2d'
  if impl == 'native':
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), 'SAME',
                                        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  b, nx, ny, nz, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  out = None
  for i in range(3):
    xs = jax.lax.slice_in_dim(xp, i, i + nx, axis=1).reshape(b * nx, ny, nz, c)
    y = jax.lax.conv_general_dilated(xs, kernel[i], (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    out = y if out is None else out + y
  return out.reshape(b, nx, ny, nz, -1)


class Conv3(nn.Module):
  """3x3x3 'SAME' convolution without bias (a norm follows), kernel f32[3, 3, 3, Cin, Cout]."""
  features: int
  impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, 3, x.shape[-1], self.features), jnp.float32)
    impl = resolve_conv_impl(self.impl) if self.impl == 'auto' else self.impl
    return conv3x3x3(x.astype(self.dtype), kernel.astype(self.dtype), impl)


class UpConv(nn.Module):
  """2x2x2 stride-2 transposed convolution as one matmul + depth-to-space (no overlap, so exact).

  x: [B, X, Y, Z, Cin] -> [B, 2X, 2Y, 2Z, features]; kernel f32[2, 2, 2, Cin, features].
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (2, 2, 2, cin, self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    y = jnp.einsum('bxyzc,ijkcf->bxiyjzkf', x.astype(self.dtype), kernel.astype(self.dtype))
    b, nx, _, ny, _, nz, _, f = y.shape
    return y.reshape(b, 2 * nx, 2 * ny, 2 * nz, f) + bias.astype(self.dtype)


def max_pool2(x):
  """2x2x2 stride-2 max-pool as reshape + max: same values as nn.max_pool, and on XLA:CPU ~8x
  faster forward + backward than reduce_window (benchmark.py). x: [B, X, Y, Z, C], X, Y, Z even."""
  b, nx, ny, nz, c = x.shape
  return x.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2, c).max(axis=(2, 4, 6))


class InstanceNorm(nn.Module):
  """Per-sample, per-channel normalisation over (X, Y, Z), learned scale and bias.

  Same maths as nn.GroupNorm(group_size=1); written as two channel-wise means in float32, which
  XLA:CPU fuses better (benchmark.py: the demo step ~20% faster).
  """
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.maximum(jnp.mean(xf * xf, axis=axes, keepdims=True) - mean * mean, 0.0)
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def _norm(kind: str, groups: int, features: int, dtype):
  if kind == 'instance':
    return InstanceNorm(dtype=dtype)
  if kind == 'group':
    return nn.GroupNorm(num_groups=min(groups, features), dtype=dtype)
  raise ValueError(f'unknown model.norm {kind!r} (instance | group)')


class DoubleConv(nn.Module):
  """(3x3x3 conv, norm, ReLU) x 2."""
  features: int
  norm: str = 'instance'
  groups: int = 8
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = Conv3(self.features, self.conv_impl, self.dtype)(x)
      x = _norm(self.norm, self.groups, self.features, self.dtype)(x)
      x = nn.relu(x)
    return x


class UNet3D(nn.Module):
  """DoubleConv encoder with 2x2x2 max-pool, transposed-conv decoder with skip concat, 1x1x1
  head."""
  base: int = 8
  levels: int = 4
  norm: str = 'instance'
  groups: int = 8
  num_classes: int = 2
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    kw = dict(norm=self.norm, groups=self.groups, dtype=self.dtype, conv_impl=self.conv_impl)
    skips = []
    for i in range(self.levels - 1):
      x = DoubleConv(self.base * 2**i, **kw)(x)
      skips.append(x)
      x = max_pool2(x)
    x = DoubleConv(self.base * 2**(self.levels - 1), **kw)(x)
    bottleneck = x
    for i in reversed(range(self.levels - 1)):
      x = UpConv(self.base * 2**i, self.dtype)(x)
      x = jnp.concatenate([x, skips[i]], axis=-1)
      x = DoubleConv(self.base * 2**i, **kw)(x)
    logits = nn.Conv(self.num_classes, (1, 1, 1), dtype=self.dtype, param_dtype=jnp.float32)(x)
    return logits.astype(jnp.float32), bottleneck.astype(jnp.float32)


class MLPHead(nn.Module):
  """Dense -> ReLU -> Dense; `normalize` L2-normalises the output (projection head)."""
  hidden: int
  out: int
  normalize: bool = False

  @nn.compact
  def __call__(self, v):
    v = nn.relu(nn.Dense(self.hidden)(v))
    v = nn.Dense(self.out)(v)
    if self.normalize:
      # rsqrt of a clamped square norm: finite gradient for the zero vectors of empty patches.
      v = v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-12))
    return v


def build(model_cfg):
  """(unet, coarse_head, projection_head) from config.model, the convolution resolved once
  (chosen_conv_impl)."""
  dtype = {
      'float32': jnp.float32,
      'bfloat16': jnp.bfloat16,
      'float16': jnp.float16
  }[model_cfg.dtype]
  impl = chosen_conv_impl(model_cfg.conv_impl)
  unet = UNet3D(base=model_cfg.base, levels=model_cfg.levels, norm=model_cfg.norm,
                groups=model_cfg.groups, dtype=dtype, conv_impl=impl)
  coarse = MLPHead(model_cfg.coarse_hidden, 2)
  proj = MLPHead(model_cfg.proj_hidden, model_cfg.proj_dim, normalize=True)
  return unet, coarse, proj
