import os

import nibabel as nib
import numpy as np
import pytest

from cgc_jax import segmenter

from conftest import tiny_config

pytestmark = pytest.mark.slow


def test_docstring_example_gives_the_predict_stage_masks(tiny_trained, tmp_path):
  wd = tiny_trained
  cfg = tiny_config()
  code = segmenter.Segmenter.__doc__.split('\n\n', 1)[1]
  code = '\n'.join(line[6:] for line in code.splitlines() if line.strip())
  case = sorted(c for c in os.listdir(os.path.join(wd, 'phantoms')) if c.startswith('phantom_'))[0]
  env = {'workdir': wd, 'case_dir': os.path.join(wd, 'phantoms', case)}
  exec(code, env)  # pylint: disable=exec-used
  want = nib.load(os.path.join(wd, 'eval', 'predictions', f'{case}.nii.gz'))
  assert env['mask'].shape == want.shape and env['mask'].dtype == np.uint8
  np.testing.assert_array_equal(env['mask'], np.asarray(want.dataobj))
  assert env['prob'].shape == want.shape
  np.testing.assert_array_equal(env['prob'] > 0.5, env['mask'] > 0)
  assert env['seg'].step == cfg.train.steps
  vols = {m: s.get_fdata() for m, s in env['scans'].items()}
  aff = env['scans']['flair'].affine
  with pytest.raises(ValueError, match='t2'):
    env['seg']({'flair': vols['flair']}, aff)
  bad = dict(vols, t1=np.where(vols['t1'] > 0, np.nan, 0))
  with pytest.raises(ValueError, match=r"volume 't1': \d+ NaN or Inf voxels"):
    env['seg'](bad, aff)
  with pytest.raises(ValueError, match=r"volume 't2': shape \(3, 4, 5\)"):
    env['seg'](dict(vols, t2=np.zeros((3, 4, 5))), aff)
  with pytest.raises(ValueError, match='affine'):
    env['seg'](vols, np.eye(3))
  with pytest.raises(segmenter.prepare.StageError, match='config.json'):
    segmenter.Segmenter.from_workdir(str(tmp_path / 'nothing'))
