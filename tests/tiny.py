"""The demo shrunk for tests: 3 phantoms at 4 mm, base-4 U-Net of 3 levels, 16^3 crops, 6 steps.

Three levels, not the demo's four: the same layers, a quarter less to compile in every test.

A config file (not only a fixture) so that subprocess tests can pass it to `cgc_jax.main`:
`--config=tests/tiny.py`.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'configs'))
import demo  # pylint: disable=g-import-not-at-top


def get_config():
  c = demo.get_config()
  c.data.phantoms.num_subjects = 3
  c.data.phantoms.lesion_free = 1
  c.data.target_spacing = (4.0, 4.0, 4.0)
  c.data.num_workers = 1
  c.gmm.subsample = 5000
  c.model.base = 4
  c.model.levels = 3
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
  return c
