"""Other ways to compute the U-Net's 'SAME' 3x3x3 convolution, measured against unet.conv3x3x3 by
`python -m cgc_jax.studies.benchmark --what=conv` (CPU candidates; none is faster there, so the
product keeps `sum2d` on CPU and XLA's native convolution elsewhere, see unet.resolve_conv_impl).

Every variant: x f[B, X, Y, Z, Cin], kernel f[3, 3, 3, Cin, Cout] -> f[B, X, Y, Z, Cout], the same
convolution as `lax.conv_general_dilated(..., 'SAME')` (tests/test_unet.py checks values and
gradients); gradients come from autodiff.
"""
import jax
import jax.numpy as jnp
import numpy as np

# Winograd F(2, 3): y = A^T [(G g) * (B^T d)] for 2 outputs of a 3-tap correlation from 4 inputs.
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)


def im2col27(x, kernel):
  """All 27 taps gathered into the channel axis, one matmul with K = 27 Cin."""
  b, nx, ny, nz, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + nx, j:j + ny, k:k + nz] for i in range(3) for j in range(3)
                          for k in range(3)], -1)
  return jnp.einsum('bxyzk,kd->bxyzd', cols, kernel.reshape(27 * c, -1))


def im2col9(x, kernel):
  """The 9 (Y, Z) taps gathered (K = 9 Cin), the X axis summed over three shifted matmuls."""
  b, nx, ny, nz, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, :, j:j + ny, k:k + nz] for j in range(3) for k in range(3)], -1)
  out = 0
  for i in range(3):
    out = out + jnp.einsum('bxyzk,kd->bxyzd', cols[:, i:i + nx], kernel[i].reshape(9 * c, -1))
  return out


def _winograd_in(x, axis: int, tiles: int):
  """B^T along `axis` of tiles of 4 with stride 2 -> the 4 transformed values stacked in front."""
  s = [jax.lax.slice_in_dim(x, i, i + 2 * tiles - 1, stride=2, axis=axis) for i in range(4)]
  return jnp.stack([s[0] - s[2], s[1] + s[2], s[2] - s[1], s[1] - s[3]], 0)


def winograd(x, kernel):
  """Winograd F(2x2x2, 3x3x3): 64 batched matmuls of K = Cin instead of 27 (3.4x fewer
  multiplications), at the price of an input 8x larger in the transformed domain. Odd sizes are
  padded to even and cropped."""
  b, nx, ny, nz, c = x.shape
  d = kernel.shape[-1]
  m = [s + s % 2 for s in (nx, ny, nz)]
  t = [s // 2 for s in m]
  xp = jnp.pad(x, ((0, 0), (1, 1 + m[0] - nx), (1, 1 + m[1] - ny), (1, 1 + m[2] - nz), (0, 0)))
  v = _winograd_in(xp, 1, t[0])  # [4x, B, T1, Y+2, Z+2, C]
  v = _winograd_in(v, 3, t[1])  # [4y, 4x, B, T1, T2, Z+2, C]
  v = _winograd_in(v, 5, t[2])  # [4z, 4y, 4x, B, T1, T2, T3, C]
  u = jnp.einsum('ja,kb,lc,abcio->lkjio', _G, _G, _G, kernel)  # [4z, 4y, 4x, Cin, Cout]
  mm = jnp.einsum('pnc,pcd->pnd', v.reshape(64, -1, c), u.reshape(64, c, d))
  mm = jnp.moveaxis(mm.reshape(4, 4, 4, b, t[0], t[1], t[2], d), 2, 0)  # [4x, 4z, 4y, B, T1..]
  y = jnp.stack([mm[0] + mm[1] + mm[2], mm[1] - mm[2] - mm[3]], 4)  # A^T along X
  y = jnp.moveaxis(y.reshape(4, 4, b, m[0], t[1], t[2], d), 1, 0)  # [4y, 4z, B, X, T2, T3, D]
  y = jnp.stack([y[0] + y[1] + y[2], y[1] - y[2] - y[3]], 4).reshape(4, b, m[0], m[1], t[2], d)
  y = jnp.stack([y[0] + y[1] + y[2], y[1] - y[2] - y[3]], 4).reshape(b, m[0], m[1], m[2], d)
  return y[:, :nx, :ny, :nz]


VARIANTS = {'im2col27': im2col27, 'im2col9': im2col9, 'winograd': winograd}
