"""The prepare stage on phantoms: exact GT round trip, resume after SIGKILL, nothing partial
read."""
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from cgc_jax.core import paths
from cgc_jax.imaging import geometry
from cgc_jax.stages import prepare

from conftest import ROOT, tiny_config


def test_prepared_ground_truth_maps_back_exactly(tiny_workdir):
  cfg = tiny_config()
  store = paths.prepared_store(cfg, tiny_workdir)
  cases = store.complete_cases()
  assert len(cases) == 3
  for c in cases:
    meta = store.meta(c)
    geom = geometry.Geometry.from_json(meta['geometry'])
    assert geom.resampled  # 2 mm phantoms prepared at 4 mm
    img = nib.load(meta['files']['label'])
    back = geometry.to_original(np.asarray(store.read(c, 'label_native')), geom.native())
    np.testing.assert_array_equal(back, (np.asarray(img.dataobj) > 0).astype(np.uint8))
    np.testing.assert_allclose(np.asarray(geom.original_affine), img.affine)
    image = store.read(c, 'image')
    assert image.dtype == np.float16 and image.shape[:3] == tuple(geom.prepared_shape)
    brain = np.asarray(store.read(c, 'brain')) > 0
    z = np.asarray(image[..., 0], np.float32)[brain]
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05  # z-scored in the brain


def test_anisotropic_phantoms_round_trip(tmp_path):
  cfg = tiny_config(**{'data.target_spacing': (3.0, 3.0, 3.0)})
  cfg.data.phantoms.spacing = (2.0, 2.0, 3.0)
  cfg.data.phantoms.num_subjects = 1
  cfg.data.phantoms.lesion_free = 0
  wd = str(tmp_path)
  cases = prepare.run(cfg, wd)
  store = paths.prepared_store(cfg, wd)
  meta = store.meta(cases[0])
  geom = geometry.Geometry.from_json(meta['geometry'])
  np.testing.assert_allclose(geom.native_spacing, (2.0, 2.0, 3.0))
  label = np.asarray(nib.load(meta['files']['label']).dataobj) > 0
  back = geometry.to_original(np.asarray(store.read(cases[0], 'label_native')), geom.native())
  np.testing.assert_array_equal(back > 0, label)
  lab_p = np.asarray(store.read(cases[0], 'label')).astype(np.float32)
  approx = geometry.prob_to_original_mask(lab_p, geom) > 0
  assert 2 * (approx & label).sum() / (approx.sum() + label.sum()) > 0.85


@pytest.mark.slow
def test_sigkill_midway_then_rerun_finishes_without_redoing(tmp_path):
  wd = tmp_path / 'wd'
  args = [sys.executable, '-m', 'cgc_jax.main', '--config=configs/demo.py', f'--workdir={wd}',
          '--mode=prepare', '--config.data.phantoms.num_subjects=6',
          '--config.data.target_spacing=(2.0,2.0,2.0)', '--config.data.num_workers=1']
  # phantoms first (not the part under test), then a prepare that is killed mid-way
  subprocess.run(args, cwd=ROOT, check=True, capture_output=True, timeout=600)
  cases_dir = wd / 'prepared' / 'cases'
  for d in cases_dir.iterdir():
    os.system(f'rm -rf "{d}"')
  os.remove(wd / 'prepared' / 'manifest.json')
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [d for d in cases_dir.iterdir() if (d / 'meta.json').exists()
           ] if cases_dir.exists() else []
    if len(done) >= 2:
      break
    time.sleep(0.02)
  proc.kill()
  proc.wait()
  finished = {d.name: os.stat(d / 'meta.json').st_mtime_ns
              for d in cases_dir.iterdir() if (d / 'meta.json').exists()}
  assert 2 <= len(finished) < 6, finished
  r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f'{len(finished)} already done, {6 - len(finished)} to do' in r.stderr
  for name, mtime in finished.items():  # finished shards were not recomputed
    assert os.stat(cases_dir / name / 'meta.json').st_mtime_ns == mtime
  assert not [d for d in os.listdir(cases_dir) if d.startswith('.tmp-')]
  assert len(paths.prepared_store(_demo_cfg(6), str(wd)).complete_cases()) == 6


def _demo_cfg(n):
  import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.data.phantoms.num_subjects = n
  c.data.target_spacing = (2.0, 2.0, 2.0)
  return c


def test_touched_or_copied_scans_are_not_prepared_again(tmp_path):
  cfg = tiny_config()
  wd = str(tmp_path / 'wd')
  prepare.run(cfg, wd)
  metas = {c: os.stat(os.path.join(wd, 'prepared', 'cases', c, 'meta.json')).st_mtime_ns
           for c in os.listdir(os.path.join(wd, 'prepared', 'cases'))}
  for root, _, files in os.walk(os.path.join(wd, 'phantoms')):
    for f in files:  # every scan gets a new mtime, as a copy without -p gives
      os.utime(os.path.join(root, f), ns=(10**18, 10**18))
  assert sorted(prepare.run(cfg, wd)) == sorted(metas)
  assert {c: os.stat(os.path.join(wd, 'prepared', 'cases', c, 'meta.json')).st_mtime_ns
          for c in metas} == metas
