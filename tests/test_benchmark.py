"""The benchmarks run and print their tables (figures themselves are machine-dependent: not
asserted); the convolution list they time is the U-Net's, counted by hand."""
import re

import pytest

from cgc_jax.studies import benchmark

from conftest import tiny_config


def _small(**kw):
  return tiny_config(**{'model.levels': 2, 'model.base': 2, 'train.crop': (8, 8, 8),
                        'train.batch_size': 1, 'data.modalities': ('flair',), **kw})


def test_conv_shapes_are_the_unets_convolutions():
  # encoder level 0: 1 -> 2, 2 -> 2; level 1 (pooled): 2 -> 4, 4 -> 4; decoder level 0 (upsampled
  # 2 channels concatenated with the skip's 2): 4 -> 2, 2 -> 2
  assert benchmark._conv_shapes(_small(), 3) == [
      ((3, 8, 8, 8), 1, 2), ((3, 8, 8, 8), 2, 2), ((3, 4, 4, 4), 2, 4), ((3, 4, 4, 4), 4, 4),
      ((3, 8, 8, 8), 4, 2), ((3, 8, 8, 8), 2, 2)]


@pytest.mark.slow  # a program of its own to compile (~30 s): the whole suite runs it
def test_conv_and_train_benchmarks_print_their_tables(capsys):
  opts = benchmark.Options(steps=1)
  benchmark.bench_conv(_small(), opts)
  out = capsys.readouterr().out
  # direct-convolution FLOPs: 2 * 27 * voxels * cin * cout per direction, three directions, the
  # first conv without its input gradient: 2 * 27 * (3 * 10752 - 1024) = 1686528
  assert 'direct-convolution count 0.001687 GFLOP' in out
  for name in ('native', 'sum2d', 'im2col27', 'im2col9', 'winograd'):
    assert re.search(rf'^\| {name} \| [0-9.e+-]+ \| [0-9.e+-]+ \| [0-9.e+-]+ \|$', out, re.M), name
  assert re.search(r'^\| sum2d \| [0-9.e+-]+ \| [0-9.e+-]+ \| 1 \|$', out, re.M)
  benchmark.bench_train(_small(**{'train.batch_size': 8}), opts)  # the tests' 8 CPU devices
  out = capsys.readouterr().out
  for row in ('train step', 'convolutions alone (fwd+bwd)', 'matmul 2048x2048 (float32)'):
    assert f'| {row} |' in out
  assert 'peak host memory' in out


def _shipped_configs():
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  root = os.path.join(ROOT, 'configs')
  for name in sorted(os.listdir(root)):
    if name.endswith('.py') and name not in ('common.py', '__init__.py'):
      spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(root, name))
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      yield name, mod.get_config()


@pytest.mark.slow
def test_the_train_benchmark_runs_on_every_shipped_config(capsys):
  """--what=train builds its batch with the input pipeline's keys, so every shipped config's step
  (symmetry weights, posterior weights, bf16 included) runs, at a tiny size (the step alone:
  --nobaselines; the yardstick rows are the test above's)."""
  names = []
  for name, c in _shipped_configs():
    c.model.levels, c.model.base = 2, 2
    c.train.crop, c.train.batch_size, c.cgc.patch = (8, 8, 8), 8, (2, 2, 2)
    benchmark.bench_train(c, benchmark.Options(steps=1, baselines=False))
    out = capsys.readouterr().out
    assert re.search(r'^\| train step \| [0-9.e+-]+ \| [0-9.e+-]+ \| [0-9.e+-]+ \| [0-9.e+-]+ \|$',
                     out, re.M), name
    assert 'convolutions alone' not in out and 'matmul' not in out, name
    names.append(name)
  assert {'brats.py', 'brats_dev.py', 'brats_sample.py', 'demo.py', 'ct_phantoms.py'} <= set(names)
