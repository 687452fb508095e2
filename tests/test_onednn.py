"""oneDNN's convolution through the XLA FFI: build, failures, fallback, arithmetic."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgc_jax import errors
from cgc_jax.model import onednn
from cgc_jax.model import unet

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f'oneDNN convolutions not built here: {onednn.reason()}')


def _lax_conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1, 1), 'SAME',
                                      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))


@needs_onednn
def test_build_once_per_machine_into_the_cache_without_leftovers(tmp_path, monkeypatch):
  monkeypatch.setenv('CGC_JAX_CACHE', str(tmp_path))
  path = onednn.build()
  assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 0
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # the temporary name was renamed
  mtime = os.path.getmtime(path)
  assert onednn.build() == path and os.path.getmtime(path) == mtime  # not built again


def test_a_failed_build_names_what_is_missing_and_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv('CGC_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(onednn.platform, 'system', lambda: 'Linux')
  monkeypatch.setattr(onednn.platform, 'machine', lambda: 'x86_64')
  with monkeypatch.context() as m:
    m.setattr(onednn, '_onednn_root', lambda: None)
    with pytest.raises(RuntimeError, match='oneDNN not found'):
      onednn.build()
  with monkeypatch.context() as m:
    m.setenv('CGC_JAX_ONEDNN_ROOT', str(tmp_path / 'nowhere'))
    with pytest.raises(RuntimeError, match='CGC_JAX_ONEDNN_ROOT=.*nowhere has no include'):
      onednn.build()
  with monkeypatch.context() as m:
    m.setattr(onednn, '_onednn_root', lambda: str(tmp_path))
    m.setattr(onednn, '_compiler', lambda: None)
    with pytest.raises(RuntimeError, match='no C\\+\\+ compiler'):
      onednn.build()
  if onednn._onednn_root() is None or onednn._compiler() is None:
    return  # the compiler's own message needs both
  bad = tmp_path / 'bad.cc'
  bad.write_text('this is not C++;\n')
  monkeypatch.setattr(onednn, 'SOURCE', str(bad))
  with pytest.raises(RuntimeError, match=r'building .*bad\.cc failed(.|\n)*error'):
    onednn.build()
  assert os.listdir(tmp_path / 'cache') == []  # nothing half-written


def test_auto_takes_onednn_on_cpu_whatever_the_devices_and_by_name_needs_it(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  monkeypatch.setattr(onednn, '_state', {'ok': False, 'reason': 'no compiler here'})
  assert unet.resolve_conv_impl('auto') == 'sum2d'
  with pytest.raises(errors.ConfigError, match='model.conv_impl=onednn: no compiler here'):
    unet.resolve_conv_impl('onednn')
  monkeypatch.setattr(onednn, '_state', {'ok': True, 'reason': ''})
  assert unet.resolve_conv_impl('auto') == 'onednn'
  assert unet.resolve_conv_impl('onednn') == 'onednn'
  monkeypatch.setattr(jax, 'device_count', lambda: 8)  # split along the batch under the mesh
  assert unet.resolve_conv_impl('auto') == 'onednn'
  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.setenv('CGC_JAX_ONEDNN', '0')
  assert not onednn.available() and 'CGC_JAX_ONEDNN=0' in onednn.reason()


@needs_onednn
@pytest.mark.parametrize('kernel', [(3, 3, 3), (1, 1, 1), (5, 3, 1)])
def test_conv3d_equals_lax_values_and_gradients_deterministically(kernel):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 5, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=kernel + (3, 4)), jnp.float32)

  def run(conv):
    def f(x, k):
      y, vjp = jax.vjp(conv, x, k)
      return (y,) + vjp(jnp.cos(y))
    return jax.jit(f)(x, k)
  want, got = run(_lax_conv), run(onednn.conv3d)
  for w, g in zip(want, got):
    w, g = np.asarray(w), np.asarray(g)
    np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max())
  for a, b in zip(got, run(onednn.conv3d)):  # bit for bit again: exact resume depends on it
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_onednn
def test_conv3d_under_vmap_and_other_dtypes_through_unet():
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.normal(size=(3, 1, 4, 5, 6, 2)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 3)), jnp.float32)
  got = jax.vmap(onednn.conv3d, (0, None))(xs, k)
  np.testing.assert_allclose(got, jax.vmap(_lax_conv, (0, None))(xs, k), atol=1e-5)
  y = unet.conv3x3x3(xs[0].astype(jnp.bfloat16), k.astype(jnp.bfloat16), 'onednn')
  assert y.dtype == jnp.bfloat16  # bfloat16 takes sum2d: the FFI handlers are float32
  np.testing.assert_allclose(np.asarray(y, np.float32), _lax_conv(xs[0], k), atol=0.1)


@needs_onednn
def test_a_bad_call_is_an_error_not_a_crash():
  x, k = jnp.ones((1, 4, 4, 4, 3)), jnp.ones((2, 3, 3, 3, 5))  # even kernel
  with pytest.raises(Exception, match='cgc_onednn_conv_fwd: x .*, an odd kernel'):
    jax.block_until_ready(onednn._call('fwd', (1, 4, 4, 4, 5), x, k))
  # the backward handlers check their buffers too: a gradient of the wrong extent or channels
  x, k = jnp.ones((1, 4, 4, 4, 3)), jnp.ones((3, 3, 3, 3, 5))
  with pytest.raises(Exception, match='cgc_onednn_conv_bwd_data: dy .* expected'):
    jax.block_until_ready(onednn._call('bwd_data', (1, 4, 4, 4, 3), jnp.ones((1, 4, 4, 4, 2)), k))
  with pytest.raises(Exception, match='cgc_onednn_conv_bwd_data: dy .* expected'):
    jax.block_until_ready(onednn._call('bwd_data', (1, 4, 4, 5, 3), jnp.ones((1, 4, 4, 4, 5)), k))
  with pytest.raises(Exception, match='cgc_onednn_conv_bwd_weights: x .* expected'):
    jax.block_until_ready(onednn._call('bwd_weights', k.shape, x, jnp.ones((1, 4, 4, 3, 5))))
  with pytest.raises(Exception, match='cgc_onednn_conv_bwd_weights: x .* expected'):
    jax.block_until_ready(onednn._call('bwd_weights', (3, 3, 3, 3, 4), x,
                                       jnp.ones((1, 4, 4, 4, 5))))


@needs_onednn
def test_the_self_test_refuses_a_library_that_computes_wrong(monkeypatch):
  onednn.self_test()  # the real one passes
  real = onednn._call
  monkeypatch.setattr(onednn, '_call', lambda t, shape, *a: real(t, shape, *a) * (
      1.001 if t == 'bwd_weights' else 1.0))
  with pytest.raises(RuntimeError, match='self-test: the kernel gradient differs'):
    onednn.self_test()


def test_the_build_is_keyed_by_the_onednn_library(tmp_path):
  lib = tmp_path / 'lib'
  lib.mkdir()
  (lib / 'libdnnl.so.3').write_bytes(b'x' * 10)
  before = onednn.library_identity(str(tmp_path))
  assert str(lib / 'libdnnl.so.3') in before
  (lib / 'libdnnl.so.3').write_bytes(b'y' * 11)  # upgraded in place
  assert onednn.library_identity(str(tmp_path)) != before


@needs_onednn
def test_on_several_devices_each_convolves_its_own_rows():
  """Under a context mesh of 8 devices (the train step and the window set one) the oneDNN call runs
  per device on its rows of the batch: the loss and both gradients equal XLA's, and the kernel's
  gradient is summed across devices by one all-reduce."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.asarray(jax.devices()[:8]), ('data',))
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8, 6, 5, 4, 3)),
                     NamedSharding(mesh, P('data')))
  k = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 3, 2)),
                     NamedSharding(mesh, P()))

  def loss(impl):
    return lambda k, x: jnp.sum(jnp.sin(unet.conv3x3x3(x, k, impl)))

  grad = jax.jit(jax.value_and_grad(loss('onednn'), argnums=(0, 1)))
  on_mesh = distributed.OnMesh(grad, mesh)
  (got, (gk, gx)) = on_mesh(k, x)
  (want, (wk, wx)) = jax.jit(jax.value_and_grad(
      lambda k, x: jnp.sum(jnp.sin(_lax_conv(x, k))), argnums=(0, 1)))(k, x)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(gk, wk, atol=1e-4 * float(jnp.abs(wk).max()))
  np.testing.assert_allclose(gx, wx, atol=1e-5 * float(jnp.abs(wx).max()))
  hlo = on_mesh.lower(k, x).compile().as_text()
  assert hlo.count('cgc_onednn_conv') == 3 and hlo.count('all-reduce(') == 1
  # each device's call sees its own row only: a batch of 1 in the program
  assert 'f32[1,6,5,4,3]' in hlo


@needs_onednn
def test_the_first_ask_may_come_from_inside_a_trace(monkeypatch):
  """unet.build resolves 'auto' while jit traces the model's init: the load and its self-test run
  eagerly there."""
  monkeypatch.setattr(onednn, '_state', {})

  @jax.jit
  def f(x):
    assert onednn.available(), onednn.reason()
    return x + 1

  np.testing.assert_array_equal(f(jnp.ones(2)), [2.0, 2.0])
