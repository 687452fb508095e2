"""The model package: --mode=export writes the workdir's networks and config into one zip;
--mode=predict --model=FILE and Segmenter.from_package predict from it without the workdir."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest

from cgc_jax import errors
from cgc_jax import pipeline
from cgc_jax import segmenter
from cgc_jax.inference import package

from conftest import ROOT

pytestmark = pytest.mark.slow


def _size(path):
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _masks(folder):
  return {f: np.asarray(nib.load(os.path.join(folder, f)).dataobj)
          for f in sorted(os.listdir(folder)) if f.endswith('.nii.gz')}


def test_export_then_predict_from_an_empty_folder_equals_predict_from_the_workdir(tiny_trained,
                                                                                   tmp_path):
  wd = tiny_trained
  scans = str(tmp_path / 'scans')
  cases = sorted(c for c in os.listdir(os.path.join(wd, 'phantoms')) if c.startswith('phantom_'))
  for c in cases[:2]:
    shutil.copytree(os.path.join(wd, 'phantoms', c), os.path.join(scans, c))
  zip_path = str(tmp_path / 'out' / 'model.zip')
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, '-m', 'cgc_jax.main']
  cfg = pipeline.workdir_config(wd)
  pipeline.export_model(cfg, wd, zip_path)  # what --mode=export runs
  manifest = json.loads(zipfile.ZipFile(zip_path).read('manifest.json'))
  assert manifest['format'] == package.FORMAT and manifest['networks'] == 1
  assert manifest['steps'] == [cfg.train.steps] and manifest['trained_cases'] == [3]
  # no optimiser state: under half of one checkpoint (params + Adam's two moments)
  assert _size(zip_path) < _size(os.path.join(wd, 'checkpoints', str(cfg.train.steps))) / 2
  # predict from the workdir, then from the package in an empty folder: the same masks
  from_wd, from_zip = str(tmp_path / 'from_wd'), str(tmp_path / 'from_zip')
  run = str(tmp_path / 'run')  # the trained workdir's copy (predict prepares the scans in it)
  shutil.copytree(wd, run, ignore=shutil.ignore_patterns('phantoms', 'predict', '.lock'))
  pipeline.run(pipeline.with_predict_paths(cfg, scans, from_wd), run, 'predict')
  # what --mode=predict --model=FILE runs, in an empty folder
  empty = str(tmp_path / 'empty')
  pipeline.run(pipeline.with_predict_paths(pipeline.package_config(zip_path), scans, from_zip),
               empty, 'predict')
  assert sorted(os.listdir(empty)) == ['config.json', 'log.txt', 'predict']
  a, b = _masks(from_wd), _masks(from_zip)
  assert sorted(a) == [f'{c}.nii.gz' for c in cases[:2]] and sorted(b) == sorted(a)
  assert any(m.any() for m in a.values())
  for f in a:
    np.testing.assert_array_equal(a[f], b[f])
  assert open(os.path.join(from_wd, 'statistics.csv')).read() == \
      open(os.path.join(from_zip, 'statistics.csv')).read()
  # Segmenter.from_package: the same mask as Segmenter.from_workdir
  c = cases[0]
  vols = {m: nib.load(os.path.join(scans, c, f'{c}_{m}.nii.gz')) for m in cfg.data.modalities}
  arrays = {m: v.get_fdata() for m, v in vols.items()}
  affine = vols[cfg.data.modalities[0]].affine
  np.testing.assert_array_equal(segmenter.Segmenter.from_package(zip_path)(arrays, affine, c),
                                a[f'{c}.nii.gz'])
  # a corrupt member, another zip, a missing file: errors naming the file
  bad = str(tmp_path / 'bad.zip')
  with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(bad, 'w') as dst:
    for item in src.infolist():
      data = src.read(item.filename)
      if item.filename == 'networks/0.msgpack':
        data = data[:-8] + bytes(8)
      dst.writestr(item, data)
  with pytest.raises(errors.StageError, match=r'bad.zip: corrupt model package: networks/0'):
    package.read(bad)
  other = str(tmp_path / 'other.zip')
  with zipfile.ZipFile(other, 'w') as z:
    z.writestr('hello.txt', 'hi')
  with pytest.raises(errors.StageError, match=r'other.zip: unreadable model package'):
    package.read(other)
  r = subprocess.run(cmd + ['--mode=predict', f'--workdir={empty}', f'--model={bad}',
                            f'--input={scans}', f'--output={tmp_path / "x"}'],
                     capture_output=True, text=True, env=env, check=False)
  assert r.returncode == 2 and 'bad.zip: corrupt model package' in r.stderr
  assert not os.path.exists(tmp_path / 'x')
