import os

from cgc_jax import main

from conftest import ROOT


def test_config_names_resolve_to_shipped_configs_and_paths_stay():
  demo = os.path.join(ROOT, 'configs', 'demo.py')
  assert main.resolve_config(['x', '--config=demo', '--workdir=w']) == [
      'x', f'--config={demo}', '--workdir=w']
  assert main.resolve_config(['--config=demo:small']) == [f'--config={demo}:small']
  assert main.resolve_config(['--config=configs/demo.py']) == ['--config=configs/demo.py']
  assert main.resolve_config(['--config=nosuch']) == ['--config=nosuch']  # absl names the problem
  assert main.resolve_config(['--config.train.steps=3']) == ['--config.train.steps=3']
