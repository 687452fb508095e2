"""Shared fixtures. 8 fake CPU devices for the data-parallel tests (set before JAX is imported)."""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'configs'))

# Identical programs compiled by several tests (same config, same mesh), in this process or in the
# subprocesses of the multi-process tests, are compiled once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='cgc_jax_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_sessionstart(session):
  """CGC_JAX_REQUIRE_ONEDNN=1 (.ci/run on Linux x86-64): oneDNN's convolutions must build and pass
  their self-test here; otherwise the session stops at once rather than skipping their tests."""
  del session
  if os.environ.get('CGC_JAX_REQUIRE_ONEDNN') == '1':
    from cgc_jax.model import onednn  # pylint: disable=g-import-not-at-top
    if not onednn.available():
      pytest.exit(f'CGC_JAX_REQUIRE_ONEDNN=1 but oneDNN convolutions are unavailable: '
                  f'{onednn.reason()}', returncode=1)


def tiny_config(**overrides):
  """tests/tiny.py's config (the demo shrunk for tests) with `section.field` overrides."""
  import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  for k, v in overrides.items():
    section, field = k.split('.')
    c[section][field] = v
  return c


def ct_phantom_config(num_subjects: int, lesion_free: int):
  """configs/cq500.py on its CQ500-like CT phantoms, small: 4 mm, one worker."""
  import cq500  # pylint: disable=g-import-not-at-top
  c = cq500.get_config()
  c.data.layout = 'phantoms'
  c.data.phantoms.num_subjects = num_subjects
  c.data.phantoms.lesion_free = lesion_free
  c.data.target_spacing = (4.0, 4.0, 4.0)
  c.data.num_workers = 1
  return c


def copy_inputs(src, dst):
  """Copies a workdir's phantoms, prepared shards, references and pseudo-labels (the offline
  stages' output)."""
  os.makedirs(dst, exist_ok=True)
  for d in ('phantoms', 'prepared', 'references', 'pseudo_labels'):
    shutil.copytree(os.path.join(src, d), os.path.join(dst, d))


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory):
  """A workdir with 3 phantoms prepared and pseudo-labelled (shared, treat as read-only)."""
  from cgc_jax.stages import prepare, pseudo_labels  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path_factory.mktemp('tiny'))
  c = tiny_config()
  prepare.run(c, wd)
  pseudo_labels.run(c, wd)
  return wd


@pytest.fixture(scope='session')
def tiny_trained(tmp_path_factory, tiny_workdir):
  """tiny_workdir's phantoms through every stage (`all`, no pictures; shared, treat as
  read-only)."""
  from cgc_jax import pipeline  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path_factory.mktemp('trained'))
  copy_inputs(tiny_workdir, wd)
  pipeline.run(tiny_config(**{'eval.pictures': False}), wd, 'all')
  return wd
