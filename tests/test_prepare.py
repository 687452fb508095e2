"""The prepare stage on phantoms: exact GT round trip, resume after SIGKILL, nothing partial
read."""
import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from cgc_jax.core import paths
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import geometry
from cgc_jax.stages import prepare

from conftest import ROOT, ct_phantom_config, tiny_config


def test_prepared_ground_truth_maps_back_exactly(tiny_workdir):
  cfg = tiny_config()
  store = paths.prepared_store(cfg, tiny_workdir)
  refs = paths.reference_store(cfg, tiny_workdir)
  cases = store.complete_cases()
  assert len(cases) == 3 and refs.complete_cases() == cases
  for c in cases:
    meta = store.meta(c)
    geom = geometry.Geometry.from_json(meta['geometry'])
    assert geom.resampled  # 2 mm phantoms prepared at 4 mm
    assert 'label' not in meta['arrays']  # ground truth lives in the reference store only
    img = nib.load(refs.meta(c)['file'])
    back = geometry.to_original(np.asarray(refs.read(c, 'label_native')), geom.native())
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
  refs = paths.reference_store(cfg, wd)
  label = np.asarray(nib.load(refs.meta(cases[0])['file']).dataobj) > 0
  back = geometry.to_original(np.asarray(refs.read(cases[0], 'label_native')), geom.native())
  np.testing.assert_array_equal(back > 0, label)
  lab_p = np.asarray(refs.read(cases[0], 'label')).astype(np.float32)
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


def _rewrite(path, fn):
  """Rewrites a NIfTI file's voxels as fn(voxels), keeping its header and dtype."""
  img = nib.load(path)
  data = np.asarray(img.dataobj)
  nib.save(nib.Nifti1Image(fn(data).astype(data.dtype), img.affine, img.header), path)


def test_ct_outside_filled_with_0_hu_is_read_as_with_minus_1024(tmp_path):
  """A CT brain-extraction tool that fills the outside with 0 HU (above the -500 HU background
  threshold) gives the same brain mask and prepared image as the same scans filled with -1024, up
  to the few brain voxels of exactly 0 HU that touch the fill."""
  cfg = ct_phantom_config(2, 0)
  air, zero = str(tmp_path / 'air'), str(tmp_path / 'zero')
  cases = prepare.run(cfg, air)
  shutil.copytree(os.path.join(air, 'phantoms'), os.path.join(zero, 'phantoms'))
  for f in prepare.case_files(cfg, zero):
    _rewrite(f.images['ct'], lambda v: np.where(v == -1024, 0, v))
    assert np.asarray(nib.load(f.images['ct']).dataobj).max() > 0
    old_rule = np.asarray(nib.load(f.images['ct']).dataobj) > cfg.data.ct_background_below
    assert old_rule.all()  # the HU threshold alone takes the whole field of view
  assert prepare.run(cfg, zero) == cases
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  for c in cases:
    pa, pz = paths.prepared_store(cfg, air), paths.prepared_store(cfg, zero)
    ba, bz = (np.asarray(s.read(c, 'brain')) > 0 for s in (pa, pz))
    # brain voxels of exactly 0 HU touching the fill cannot be told from it: a handful at the edge
    differ = ba != bz
    assert differ.sum() <= 1e-4 * ba.size and not (bz & ~ba).any()
    assert not (differ & ndimage.binary_erosion(ba)).any()  # only on the brain's edge
    both = ba & bz
    np.testing.assert_array_equal(np.asarray(pa.read(c, 'image'))[both],
                                  np.asarray(pz.read(c, 'image'))[both])


def test_a_raw_scan_is_named_in_a_warning_or_stopped_under_strict_brain_mask(tmp_path,
                                                                              tiny_workdir):
  """A skull shell and a noisy background around a phantom's brain: the brain mask covers the
  field of view; verify and prepare warn naming the file, data.strict_brain_mask stops the case
  (exit 2's StageError naming it) and prepares the others. Brain-extracted phantoms: no warning."""
  from cgc_jax import errors  # pylint: disable=g-import-not-at-top
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  wd = str(tmp_path / 'wd')
  shutil.copytree(os.path.join(tiny_workdir, 'phantoms'), os.path.join(wd, 'phantoms'))
  files = prepare.case_files(cfg, wd)
  data_cfg = prepare.reader_config(cfg)
  for f in files:
    assert prepare.prepare_case(f, data_cfg, '', '', write=False)['warnings'] == []
  raw = files[0]
  rng = np.random.default_rng(0)

  def add_head(v):
    brain = v != 0
    shell = ndimage.binary_dilation(brain, iterations=3) & ~ndimage.binary_dilation(brain)
    noise = np.abs(rng.normal(0.0, 0.05 * float(v.max()), v.shape)) + 1e-3
    return np.where(brain, v, np.where(shell, 1.5 * float(v.max()), noise))

  for m in data_cfg.modalities:
    _rewrite(raw.images[m], add_head)
  warnings = prepare.prepare_case(raw, data_cfg, '', '', write=False)['warnings']
  assert len(warnings) == 1 and warnings[0].startswith(raw.images[data_cfg.modalities[0]])
  assert 'covers 100% of the volume' in warnings[0] and 'reaches 6 of its 6 faces' in warnings[0]
  assert prepare.run(cfg, wd) == sorted(f.case_id for f in files)  # a warning only
  meta = paths.prepared_store(cfg, wd).meta(raw.case_id)
  assert any('not brain-extracted' in w for w in meta['warnings'])
  strict = tiny_config(**{'data.strict_brain_mask': True})
  wd2 = str(tmp_path / 'wd2')
  shutil.copytree(os.path.join(wd, 'phantoms'), os.path.join(wd2, 'phantoms'))
  with pytest.raises(errors.StageError, match='1 of 3 cases failed') as e:
    prepare.run(strict, wd2)
  assert raw.images[data_cfg.modalities[0]].replace(wd, wd2) in str(e.value)
  assert 'strict_brain_mask' in str(e.value)
  assert len(paths.prepared_store(strict, wd2).complete_cases()) == 2  # the others are kept


def test_mri_outside_filled_with_another_constant_is_the_outside():
  """A skull-stripped MRI whose outside is -1 (not 0): the -1 region touching the border is the
  outside; -1 and 0 voxels inside the brain stay brain. Outside 0: nonzero in every channel."""
  cfg = tiny_config()
  v = np.full((12, 12, 12), -1.0, np.float32)
  v[3:9, 3:9, 3:9] = 5.0
  v[5, 5, 5], v[6, 6, 6] = -1.0, 0.0  # inside the brain, not connected to the border
  brain, approximate = geometry.brain_mask([v, v], cfg.data)
  want = np.zeros(v.shape, bool)
  want[3:9, 3:9, 3:9] = True
  np.testing.assert_array_equal(brain, want)
  assert not approximate
  zero = np.where(v == -1.0, 0.0, v)
  want_zero = want.copy()
  want_zero[5, 5, 5] = want_zero[6, 6, 6] = False
  np.testing.assert_array_equal(geometry.brain_mask([zero, zero], cfg.data)[0], want_zero)
  assert geometry.raw_scan_problem(want, [v], cfg.data) is None
  assert 'covers 100%' in geometry.raw_scan_problem(np.ones_like(want), [v], cfg.data)


@pytest.mark.slow  # prepares the tiny cases twice
def test_a_shard_prepared_with_its_label_stays_current_and_gains_a_reference(tiny_workdir,
                                                                            tmp_path):
  """Earlier versions kept the label in the prepared shard and its file among the shard's inputs:
  such a shard is not prepared again (its identity, so P and the networks, unchanged), and the
  label file is read into the reference store beside it."""
  import json  # pylint: disable=g-import-not-at-top
  from conftest import copy_inputs  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  wd = str(tmp_path / 'wd')
  copy_inputs(tiny_workdir, wd)
  shutil.rmtree(os.path.join(wd, 'references'))
  store = paths.prepared_store(cfg, wd)
  files = {f.case_id: f for f in prepare.case_files(cfg, wd)}
  for c in store.complete_cases():
    path = os.path.join(store.case_dir(c), 'meta.json')
    with open(path) as f:
      meta = json.load(f)
    meta['inputs'] = dict(prepare.case_inputs(files[c]),
                          **store_lib.file_identity([files[c].label]))
    meta['files']['label'], meta['has_label'] = files[c].label, True
    with open(path, 'w') as f:
      json.dump(meta, f)
  def stamps(store):
    return {c: (store.identity(c), os.stat(os.path.join(store.case_dir(c),
                                                        'meta.json')).st_mtime_ns)
            for c in store.complete_cases()}
  before = stamps(store)
  assert prepare.run(cfg, wd) == sorted(before)
  store = paths.prepared_store(cfg, wd)
  assert stamps(store) == before
  refs = paths.reference_store(cfg, wd)
  assert refs.complete_cases() == sorted(before)
  # a label edited afterwards: its reference is made again, the image shard stays
  lab = nib.load(files[sorted(before)[0]].label)
  data = np.zeros(lab.shape, np.uint8)
  x, y, z = (n // 2 for n in lab.shape)
  data[x:x + 3, y:y + 3, z:z + 2] = 1  # in the brain box
  nib.save(nib.Nifti1Image(data, lab.affine, lab.header), files[sorted(before)[0]].label)
  prepare.run(cfg, wd)
  assert store.identity(sorted(before)[0]) == before[sorted(before)[0]][0]
  geom = geometry.Geometry.from_json(store.meta(sorted(before)[0])['geometry'])
  back = geometry.to_original(np.asarray(refs.read(sorted(before)[0], 'label_native')),
                              geom.native())
  np.testing.assert_array_equal(back, data)


def test_extra_roots_join_the_pool_unlabelled_and_prepare_only_their_cases(tiny_workdir,
                                                                             tmp_path):
  """data.extra_roots: a folder of more scans in the same layout. Its case is prepared and
  pseudo-labelled beside the root's (the same scan under another id gets the same shard and the
  same P), its label file is never read (no reference), the root's shards are not prepared again
  (the prepare fingerprint ignores the field), and a repeated case id is an error naming both."""
  from cgc_jax.stages import pseudo_labels  # pylint: disable=g-import-not-at-top
  from conftest import copy_inputs  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / 'wd')
  copy_inputs(tiny_workdir, wd)
  src = os.path.join(wd, 'phantoms', 'phantom_mri_001')
  extra = tmp_path / 'extra'
  os.makedirs(extra / 'more_001')
  for name in os.listdir(src):  # the same scan (and its label file) under another case id
    shutil.copy(os.path.join(src, name),
                extra / 'more_001' / name.replace('phantom_mri_001', 'more_001'))
  assert any(n.endswith('_seg.nii.gz') for n in os.listdir(extra / 'more_001'))
  base = tiny_config()
  cfg = tiny_config(**{'data.extra_roots': (str(extra),)})
  from cgc_jax.core import fingerprints  # pylint: disable=g-import-not-at-top
  assert fingerprints.of(cfg, 'prepare') == fingerprints.of(base, 'prepare')
  files = prepare.case_files(cfg, wd)
  assert [f.case_id for f in files] == ['phantom_mri_000', 'phantom_mri_001', 'phantom_mri_002',
                                        'more_001']
  assert files[-1].label is None and files[1].label is not None
  prep = paths.prepared_store(cfg, wd)
  prepare.run(base, wd)  # the root's shards current for this workdir's copy of the phantoms
  stamps = {c: os.path.getmtime(os.path.join(prep.case_dir(c), 'meta.json'))
            for c in prep.complete_cases()}
  assert len(stamps) == 3
  assert prepare.run(cfg, wd) == [f.case_id for f in files]
  for c, t in stamps.items():
    assert os.path.getmtime(os.path.join(prep.case_dir(c), 'meta.json')) == t
  for name in ('image', 'brain'):
    np.testing.assert_array_equal(prep.read('more_001', name), prep.read('phantom_mri_001', name))
  refs = paths.reference_store(cfg, wd)
  assert refs.meta('more_001', missing_ok=True) is None
  assert refs.meta('phantom_mri_001', missing_ok=True) is not None
  pseudo_labels.run(cfg, wd)
  pl = paths.pl_store(cfg, wd)
  assert 'more_001' in pl.complete_cases()
  np.testing.assert_array_equal(pl.read('more_001', 'p'), pl.read('phantom_mri_001', 'p'))
  # a case id that the root already has
  os.makedirs(tmp_path / 'clash' / 'phantom_mri_000')
  for name in os.listdir(os.path.join(wd, 'phantoms', 'phantom_mri_000')):
    shutil.copy(os.path.join(wd, 'phantoms', 'phantom_mri_000', name),
                tmp_path / 'clash' / 'phantom_mri_000' / name)
  clash = tiny_config(**{'data.extra_roots': (str(extra), str(tmp_path / 'clash'))})
  with pytest.raises(prepare.readers.DataError,
                     match=r"clash/phantom_mri_000: case id 'phantom_mri_000' .* is also at .*"
                           r"phantoms/phantom_mri_000"):
    prepare.case_files(clash, wd)
  missing = tiny_config(**{'data.extra_roots': (str(tmp_path / 'nowhere'),)})
  with pytest.raises(prepare.readers.DataError,
                     match=r"nowhere: data.extra_roots entry does not exist or is not a folder"):
    prepare.case_files(missing, wd)
