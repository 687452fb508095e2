import numpy as np
import pytest
from ml_collections import ConfigDict

from cgc_jax import errors
from cgc_jax.core import config_rules
from cgc_jax.imaging import bias_field

sitk = pytest.importorskip('SimpleITK')


def _scan(shape=(64, 64, 48), seed=0):
  """Two tissues (a sphere of 'white matter' at 1.0 inside 'grey matter' at 0.6, a little noise)
  under a smooth multiplicative field that rises 1.6x from one side of the brain to the other."""
  rng = np.random.default_rng(seed)
  g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1).astype(np.float32)
  r = np.sqrt((((g - np.array(shape) / 2) / (np.array(shape) / 2)) ** 2).sum(-1))
  brain = r < 0.9
  tissue = np.where(r < 0.5, 1.0, 0.6) * brain
  field = np.exp(np.log(1.6) * (g[..., 0] / shape[0] - 0.5))
  scan = (tissue * field + 0.01 * rng.standard_normal(shape)) * brain
  return scan.astype(np.float32), tissue.astype(np.float32), brain


def _spread(scan, tissue, brain):
  """Coefficient of variation of the outer tissue over the brain: the field's footprint."""
  v = scan[brain & (tissue == np.float32(0.6))]
  return v.std() / v.mean()


def test_n4_removes_most_of_a_smooth_field_and_leaves_the_outside():
  scan, tissue, brain = _scan()
  out = bias_field.n4(scan, brain, (1.0, 1.0, 1.0), shrink=2, iterations=(50, 50, 30))
  before, after = _spread(scan, tissue, brain), _spread(out, tissue, brain)
  # the 1.6x field spreads the tissue by ~10%; after N4 what is left is mostly the noise (~2%)
  assert before > 0.08 and after < 0.3 * before, (before, after)
  # the two tissues still differ by their contrast (N4 divides a smooth field, not the tissues)
  wm = out[brain & (tissue == 1.0)].mean()
  gm = out[brain & (tissue == np.float32(0.6))].mean()
  assert 1.45 < wm / gm < 1.85, wm / gm
  np.testing.assert_array_equal(out[~brain], scan[~brain])


def test_correct_is_a_no_op_when_off_and_refuses_ct():
  scan, _, brain = _scan((24, 24, 20))
  img = scan[..., None]
  cfg = ConfigDict({'kind': 'mri', 'bias_field': 'none', 'n4_shrink': 2,
                    'n4_iterations': (10,)})
  assert bias_field.correct(img, brain, (1.0, 1.0, 1.0), cfg) is img
  cfg.kind = 'ct'
  cfg.bias_field = 'n4'
  with pytest.raises(ValueError, match='MRI'):
    bias_field.correct(img, brain, (1.0, 1.0, 1.0), cfg)
  bad = ConfigDict({'data': {'kind': 'ct', 'bias_field': 'n4', 'n4_shrink': 0}})
  msg = '; '.join(config_rules.problems(bad))
  assert 'data.bias_field' in msg and 'data.n4_shrink' in msg


def test_missing_simpleitk_names_the_switch_and_the_install(monkeypatch):
  import builtins
  real = builtins.__import__

  def no_sitk(name, *a, **k):
    if name == 'SimpleITK':
      raise ImportError('no SimpleITK')
    return real(name, *a, **k)
  monkeypatch.setattr(builtins, '__import__', no_sitk)
  scan, _, brain = _scan((24, 24, 20))
  with pytest.raises(errors.DataError, match="pip install SimpleITK"):
    bias_field.n4(scan, brain, (1.0, 1.0, 1.0), 2, (10,))


def test_a_fit_itk_refuses_is_a_data_error_not_a_traceback():
  """ITK's own exception (here: a shrink factor larger than the scan) comes back as a DataError,
  which prepare prefixes with the scan's file name."""
  scan, _, brain = _scan((24, 24, 20))
  with pytest.raises(errors.DataError, match="N4 bias-field correction failed"):
    bias_field.n4(scan, brain, (1.0, 1.0, 1.0), shrink=1000, iterations=(10,))
