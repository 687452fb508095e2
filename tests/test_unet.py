import importlib

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgc_jax.model import onednn
from cgc_jax.model import unet
from cgc_jax.studies import benchmark
from cgc_jax.studies import conv_variants


def test_sum2d_conv_equals_native_conv_and_gradients():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 5, 7, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)), jnp.float32)
  a = unet.conv3x3x3(x, k, 'native')
  b = unet.conv3x3x3(x, k, 'sum2d')
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
  loss = lambda impl: lambda x, k: jnp.sum(jnp.sin(unet.conv3x3x3(x, k, impl)))
  ga = jax.grad(loss('native'), (0, 1))(x, k)
  gb = jax.grad(loss('sum2d'), (0, 1))(x, k)
  for u, v in zip(ga, gb):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-4)


def _with_grads(f):
  """One program: f(x, k) and the gradients of sum(sin(f)) (cotangent cos(f)) w.r.t. x and k."""
  def run(x, k):
    y, vjp = jax.vjp(f, x, k)
    return (y, *vjp(jnp.cos(y)))
  return jax.jit(run)


def _assert_match(want, got, rtol, what=''):
  """Values, d/dx and d/dk within rtol of their largest magnitude; d/dk sums over every voxel (up
  to 10^6 f32 terms, added in another order by each formulation), so it gets 10 x rtol."""
  for w, g, tol, name in zip(want, got, (rtol, rtol, 10 * rtol), ('y', 'dx', 'dk')):
    w, g = np.asarray(w), np.asarray(g)
    assert g.shape == w.shape, (what, name)
    np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max(), err_msg=f'{what} {name}')


def _values_and_grads_match(x, k, fn, rtol):
  """fn(x, k), d/dx and d/dk of sum(sin(fn)) against lax.conv_general_dilated's."""
  _assert_match(_with_grads(lambda x, k: unet.conv3x3x3(x, k, 'native'))(x, k),
                _with_grads(fn)(x, k), rtol)


@pytest.mark.parametrize('name', ['im2col27', 'im2col9', 'winograd'])
def test_conv_variants_equal_native_conv_and_gradients(name):
  rng = np.random.default_rng(1)
  for shape in ((2, 6, 5, 7, 3), (1, 4, 4, 4, 2)):  # odd and even sizes
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, shape[-1], 4)), jnp.float32)
    _values_and_grads_match(x, k, conv_variants.VARIANTS[name], 1e-5)


_CONFIGS = ('demo', 'brats_sample', 'brats_dev', 'brats', 'brats_paper_geometry', 'ct_phantoms',
            'cq500')


@pytest.mark.slow
def test_cpu_convs_equal_native_at_every_conv_shape_of_the_configs():
  """Every distinct 3x3x3 convolution of the configs' U-Nets (batch 1), values and gradients, for
  the convolution the configs run on this CPU ('auto': oneDNN where it is built, else sum2d)
  against one native reference per shape. Each spatial axis is capped at 24 voxels (25 where it is
  odd): what differs between the configs' shapes is their channel counts (oneDNN's blocking) and
  their edges (padding, odd sizes), not the length of the interior, and the cap keeps the test
  within a CPU suite's time. Where oneDNN runs, sum2d (XLA's own 2D convolutions, no blocking of
  its own) is checked at odd and even sizes by test_sum2d_conv_equals_native_conv_and_gradients
  and through a whole train step by test_train."""
  impls = [unet.resolve_conv_impl('auto')]
  shapes = set()
  for name in _CONFIGS:
    for s, cin, cout in benchmark._conv_shapes(importlib.import_module(name).get_config(), 1):
      shapes.add((tuple(min(v, 24 + v % 2) for v in s[1:]), cin, cout))
  rng = np.random.default_rng(0)
  for spatial, cin, cout in sorted(shapes):
    x = jnp.asarray(rng.normal(size=(1,) + spatial + (cin,)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, cin, cout)) / np.sqrt(27 * cin), jnp.float32)
    want = _with_grads(lambda x, k: unet.conv3x3x3(x, k, 'native'))(x, k)
    for impl in impls:
      got = _with_grads(lambda x, k, impl=impl: unet.conv3x3x3(x, k, impl))(x, k)
      _assert_match(want, got, 1e-5, f'{impl} at {spatial} {cin}->{cout}')
  if 'onednn' not in impls:
    pytest.skip(f'sum2d checked; oneDNN convolutions not built here: {onednn.reason()}')


def test_upconv_is_a_stride2_transposed_conv():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 3, 4, 2, 3)), jnp.float32)
  up = unet.UpConv(5)
  v = up.init(jax.random.key(0), x)
  y = np.asarray(up.apply(v, x))
  k, b = v['params']['kernel'], v['params']['bias'] + 0.3
  y = np.asarray(up.apply({'params': {'kernel': k, 'bias': b}}, x))
  # the reference: flax's transposed convolution (lax.conv_transpose), i.e. the adjoint of the
  # stride-2 2x2x2 convolution whose kernel is k with its in/out axes swapped
  ref = nn.ConvTranspose(5, (2, 2, 2), strides=(2, 2, 2), padding='VALID', transpose_kernel=True)
  want = ref.apply({'params': {'kernel': jnp.swapaxes(k, -1, -2), 'bias': b}}, x)
  assert y.shape == (1, 6, 8, 4, 5)
  np.testing.assert_allclose(y, np.asarray(want), atol=1e-5)


def test_unet_shapes_and_dtypes():
  net = unet.UNet3D(base=4, levels=4, dtype=jnp.bfloat16, conv_impl='sum2d')
  x = jnp.zeros((2, 16, 24, 8, 2))
  v = jax.eval_shape(net.init, jax.random.key(0), x)  # shapes only: bf16 compute is slow on CPU
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))  # float32 parameters
  logits, feats = jax.eval_shape(net.apply, v, x)
  assert logits.shape == (2, 16, 24, 8, 2) and logits.dtype == jnp.float32
  assert feats.shape == (2, 2, 3, 1, 32)


def test_projection_head_is_unit_norm_and_zero_safe():
  head = unet.MLPHead(8, 4, normalize=True)
  v = head.init(jax.random.key(0), jnp.ones((3, 5)))
  out = head.apply(v, jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)), jnp.float32))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-5)
  g = jax.grad(lambda p: head.apply(p, jnp.zeros((2, 5))).sum())(v)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(g))


@pytest.mark.slow
def test_instance_and_group_norm_are_batch_independent():
  for norm in ('instance', 'group'):
    net = unet.UNet3D(base=4, levels=2, norm=norm, conv_impl='sum2d')
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 8, 1)), jnp.float32)
    # one init program, its parameters from XLA's RngBitGenerator: threefry's init compiles ~10 s
    v = jax.jit(net.init)(jax.random.key(0, impl='rbg'), x)
    apply = jax.jit(net.apply)
    both, _ = apply(v, x)
    one, _ = apply(v, x[1:])
    np.testing.assert_allclose(np.asarray(both[1:]), np.asarray(one), atol=1e-5)


def test_max_pool2_equals_flax_max_pool():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 6, 8, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(unet.max_pool2(x)),
                                np.asarray(nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))))


def test_instance_norm_equals_flax_group_norm_of_size_one():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 6, 7, 3)) * 3 + 1, jnp.float32)
  ours = unet.InstanceNorm()
  ref = nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-6)
  np.testing.assert_allclose(np.asarray(ours.apply(ours.init(jax.random.key(0), x), x)),
                             np.asarray(ref.apply(ref.init(jax.random.key(0), x), x)), atol=1e-5)
