"""oneDNN's 3D convolution for XLA:CPU, through the XLA FFI: built once per machine, optional.

XLA:CPU's own 3D convolutions run far below the machine's matmul peak (docs/benchmarks.md). This
module compiles `native/onednn_conv.cc` (three FFI handlers: forward, gradient of the input,
gradient of the kernel) against oneDNN, Intel's convolution library that PyTorch's CPU build also
uses, and jaxlib's FFI headers, and registers them with XLA:CPU. `conv3d` is the 'SAME', stride-1
convolution of `lax.conv_general_dilated` (NDHWC, DHWIO) with a custom VJP made of the two
backward handlers.

What it needs, all found at first use: Linux on x86-64; oneDNN's library and headers (the pip
packages onednn-cpu-gomp and onednn-devel-cpu-gomp, in requirements.txt, or $CGC_JAX_ONEDNN_ROOT
holding lib/ and include/); a C++17 compiler ($CXX, else c++ or g++). The library is built into
$CGC_JAX_CACHE (default ~/.cache/cgc_jax), under a name keyed by the source, jaxlib's version,
oneDNN's library (its path, size and modification time), the compiler and the compile command, so
a machine builds it once (a few seconds) and processes share it, and an upgraded oneDNN or compiler
builds anew; the build goes to a temporary name first and is renamed into place, so concurrent
processes never load a half-written file. Once loaded, a self-test runs the three handlers on a
small case against lax.conv_general_dilated and its VJP: a library that loads but computes wrong
(or fails) is refused at load time, never mid-run. When anything is missing or fails,
`available()` is False, the reason is logged once, and `unet.resolve_conv_impl('auto')` keeps
XLA's own `sum2d`. CGC_JAX_ONEDNN=0 turns it off. The handlers check every buffer's shape and
return an error (not a crash) on a mismatch.
"""
import ctypes
import glob
import hashlib
import os
import platform
import shutil
import site
import subprocess
import sys
import tempfile
import threading

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from cgc_jax.core import paths

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'native', 'onednn_conv.cc')
TARGETS = ('fwd', 'bwd_data', 'bwd_weights')

_lock = threading.Lock()
_state = {}  # 'ok': bool, 'reason': str, 'path': str


def _has_onednn(root) -> bool:
  return (os.path.exists(os.path.join(root, 'include', 'oneapi', 'dnnl', 'dnnl.hpp')) and
          bool(glob.glob(os.path.join(root, 'lib', 'libdnnl.so*'))))


def _onednn_root():
  """A prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so*, or None. Raises
  RuntimeError when $CGC_JAX_ONEDNN_ROOT is set to a folder without them (a user's explicit choice
  is not silently replaced by another oneDNN)."""
  chosen = os.environ.get('CGC_JAX_ONEDNN_ROOT')
  if chosen:
    if not _has_onednn(chosen):
      raise RuntimeError(f'CGC_JAX_ONEDNN_ROOT={chosen} has no include/oneapi/dnnl/dnnl.hpp and '
                         'lib/libdnnl.so*')
    return chosen
  # pip's data files land in the first three
  for r in (sys.prefix, site.getuserbase(), sys.base_prefix, '/usr/local', '/usr'):
    if _has_onednn(r):
      return r
  return None


def _compiler():
  for c in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if c and shutil.which(c):
      return shutil.which(c)
  return None


def library_identity(root: str) -> str:
  """oneDNN's shared libraries under `root`: real path, size and mtime of each (a reinstalled or
  upgraded oneDNN gives another identity, and with it another build)."""
  parts = []
  for lib in sorted(glob.glob(os.path.join(root, 'lib', 'libdnnl.so*'))):
    st = os.stat(lib)
    parts.append(f'{os.path.realpath(lib)}:{st.st_size}:{st.st_mtime_ns}')
  return ';'.join(parts)


def self_test():
  """Runs the three handlers on a small case (batch 2, 5x4x3, 3 -> 2 channels, 3x3x3 kernel) and
  compares them with lax.conv_general_dilated and its VJP; raises RuntimeError on a mismatch. Runs
  eagerly even when first asked for inside a trace (unet.build under jit)."""
  with jax.ensure_compile_time_eval():
    _self_test()


def _self_test():
  """oneDNN's forward and both gradients against XLA's convolution on a small odd-sized case, as
  one jitted program on NumPy inputs (eager ops and threefry would each compile on their own: the
  check would cost every process ~5 s at start instead of ~0.5 s)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 4, 3, 3)).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, 3, 2)).astype(np.float32)
  dy = rng.standard_normal((2, 5, 4, 3, 2)).astype(np.float32)

  def ref(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1, 1), 'SAME',
                                        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'),
                                        precision=jax.lax.Precision.HIGHEST)

  @jax.jit
  def errors(x, k, dy):
    got_y, got_vjp = jax.vjp(conv3d, x, k)
    want_y, want_vjp = jax.vjp(ref, x, k)
    return [jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12)
            for a, b in zip((got_y,) + got_vjp(dy), (want_y,) + want_vjp(dy))]

  for name, err in zip(('forward', 'input gradient', 'kernel gradient'), errors(x, k, dy)):
    err = float(err)
    if not err < 1e-4:
      raise RuntimeError(f'self-test: the {name} differs from XLA\'s by {err:.2e} (relative)')


def build() -> str:
  """Compiles the FFI library if this machine has not yet -> its path. Raises RuntimeError naming
  what is missing (platform, oneDNN, compiler) or the compiler's own message."""
  if platform.system() != 'Linux' or platform.machine() not in ('x86_64', 'AMD64'):
    raise RuntimeError(f'oneDNN convolutions are built for Linux x86-64 only (this is '
                       f'{platform.system()} {platform.machine()})')
  root = _onednn_root()
  if root is None:
    raise RuntimeError('oneDNN not found (pip install onednn-cpu-gomp onednn-devel-cpu-gomp, or '
                       'set CGC_JAX_ONEDNN_ROOT to a folder with include/ and lib/)')
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError('no C++ compiler found (set CXX, or install g++)')
  with open(SOURCE, 'rb') as f:
    src = f.read()
  out_dir = paths.cache_dir()
  cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}',
         f'-I{os.path.join(root, "include")}', SOURCE, f'-L{os.path.join(root, "lib")}', '-ldnnl',
         f'-Wl,-rpath,{os.path.join(root, "lib")}', '-o']
  key = hashlib.sha256(src + jaxlib.__version__.encode() + library_identity(root).encode() +
                       ' '.join(cmd).encode()).hexdigest()[:16]
  path = os.path.join(out_dir, f'libcgc_onednn_{key}.so')
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.libcgc_onednn_', suffix='.so', dir=out_dir)
  os.close(fd)
  cmd = cmd + [tmp]
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
      raise RuntimeError(f'building {SOURCE} failed ({" ".join(cmd)}):\n{r.stderr[-2000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def available() -> bool:
  """True when the oneDNN convolution is built, loaded and registered with XLA:CPU in this
  process (done once; later calls are free). False with the reason logged once otherwise."""
  with _lock:
    if 'ok' in _state:
      return _state['ok']
    try:
      if os.environ.get('CGC_JAX_ONEDNN', '1') == '0':
        raise RuntimeError('turned off by CGC_JAX_ONEDNN=0')
      path = build()
      lib = ctypes.cdll.LoadLibrary(path)
      for t in TARGETS:
        jax.ffi.register_ffi_target(f'cgc_onednn_conv_{t}',
                                    jax.ffi.pycapsule(getattr(lib, f'cgc_onednn_conv_{t}')),
                                    platform='cpu')
      self_test()
      _state.update(ok=True, path=path, reason='')
      logging.info('oneDNN convolutions loaded from %s (self-test passed)', path)
    except (RuntimeError, OSError, AttributeError, jax.errors.JaxRuntimeError) as e:
      _state.update(ok=False, reason=str(e))
      logging.info('oneDNN convolutions unavailable, XLA\'s own are used: %s', e)
    return _state['ok']


def reason() -> str:
  """Why `available()` is False ('' when it is True)."""
  available()
  return _state['reason']


def _call(target, out_shape, *args):
  return jax.ffi.ffi_call(f'cgc_onednn_conv_{target}', jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method='sequential')(*args)


@jax.custom_vjp
def conv3d(x, kernel):
  """'SAME' stride-1 3D convolution. x: f32[B, X, Y, Z, Cin], kernel: f32[KX, KY, KZ, Cin, Cout]
  (odd sizes) -> f32[B, X, Y, Z, Cout]; lax.conv_general_dilated's result to float32 rounding.
  Needs `available()`."""
  return _call('fwd', x.shape[:4] + kernel.shape[4:], x, kernel)


def _fwd(x, kernel):
  return conv3d(x, kernel), (x, kernel)


def _bwd(res, dy):
  x, kernel = res
  return _call('bwd_data', x.shape, dy, kernel), _call('bwd_weights', kernel.shape, x, dy)


conv3d.defvjp(_fwd, _bwd)
