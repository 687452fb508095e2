"""Flax Linen 3D U-Net backbone and the CGC heads.

Array contract: `UNet3D(image: f[B, X, Y, Z, C]) -> (logits f32[B, X, Y, Z, 2],
bottleneck f32[B, X/s, Y/s, Z/s, base * 2**(levels-1)])` with s = 2**(levels-1); X, Y, Z divisible
by s. Compute runs in `dtype` (bfloat16 on accelerators), parameters are float32. Norms are
batch-independent (instance or group), so data parallelism needs no cross-device statistics.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _norm(kind: str, groups: int, features: int, dtype):
  if kind == 'instance':
    return nn.GroupNorm(num_groups=None, group_size=1, dtype=dtype)
  if kind == 'group':
    return nn.GroupNorm(num_groups=min(groups, features), dtype=dtype)
  raise ValueError(f'unknown model.norm {kind!r} (instance | group)')


class DoubleConv(nn.Module):
  """(3x3x3 conv, norm, ReLU) x 2."""
  features: int
  norm: str = 'instance'
  groups: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3, 3), padding='SAME', use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32)(x)
      x = _norm(self.norm, self.groups, self.features, self.dtype)(x)
      x = nn.relu(x)
    return x


class UNet3D(nn.Module):
  """DoubleConv encoder with 2x2x2 max-pool, transposed-conv decoder with skip concat, 1x1x1 head."""
  base: int = 8
  levels: int = 4
  norm: str = 'instance'
  groups: int = 8
  num_classes: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    kw = dict(norm=self.norm, groups=self.groups, dtype=self.dtype)
    skips = []
    for i in range(self.levels - 1):
      x = DoubleConv(self.base * 2**i, **kw)(x)
      skips.append(x)
      x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
    x = DoubleConv(self.base * 2**(self.levels - 1), **kw)(x)
    bottleneck = x
    for i in reversed(range(self.levels - 1)):
      x = nn.ConvTranspose(self.base * 2**i, (2, 2, 2), strides=(2, 2, 2), dtype=self.dtype,
                           param_dtype=jnp.float32)(x)
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
  """(unet, coarse_head, projection_head) from config.model."""
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[model_cfg.dtype]
  unet = UNet3D(base=model_cfg.base, levels=model_cfg.levels, norm=model_cfg.norm,
                groups=model_cfg.groups, dtype=dtype)
  coarse = MLPHead(model_cfg.coarse_hidden, 2)
  proj = MLPHead(model_cfg.proj_hidden, model_cfg.proj_dim, normalize=True)
  return unet, coarse, proj
