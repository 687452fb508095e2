"""Shared fixtures. 8 fake CPU devices for the data-parallel tests (set before JAX is imported)."""
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'configs'))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

# Identical programs compiled by several tests (same config, same mesh) are compiled once.
jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='cgc_jax_xla_cache_'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def tiny_config(**overrides):
  """Demo config shrunk for tests: 3 phantoms at 4 mm, base-4 U-Net, 16^3 crops."""
  import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.data.phantoms.num_subjects = 3
  c.data.phantoms.lesion_free = 1
  c.data.target_spacing = (4.0, 4.0, 4.0)
  c.data.num_workers = 1
  c.gmm.subsample = 5000
  c.model.base = 4
  c.model.coarse_hidden = 8
  c.model.proj_hidden = 8
  c.model.proj_dim = 8
  c.train.crop = (16, 16, 16)
  c.train.batch_size = 8
  c.train.steps = 6
  c.train.warmup_steps = 2
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  c.train.num_workers = 1
  c.cgc.patch = (2, 2, 2)
  c.eval.pictures = False
  for k, v in overrides.items():
    section, field = k.split('.')
    c[section][field] = v
  return c


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory):
  """A workdir with 3 phantoms prepared and pseudo-labelled (shared, treat as read-only)."""
  from cgc_jax import prepare, pseudo_labels  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path_factory.mktemp('tiny'))
  c = tiny_config()
  prepare.run(c, wd)
  pseudo_labels.run(c, wd)
  return wd
