"""The GPU and TPU programs lower without an accelerator: configs/brats.py's bf16 train step,
sliding-window step and on-device crop cut over the 8-device mesh export for cuda and tpu; the
roofline's arithmetic."""
import jax
from jax import export

from cgc_jax.runtime import distributed
from cgc_jax.studies import accelerators

from test_benchmark import _shipped_configs


def _brats():
  c = dict(_shipped_configs())['brats.py']
  c.model.conv_impl = 'native'  # the accelerators' convolution ('auto' picks it there)
  return c


def test_the_brats_train_and_window_steps_export_for_cuda_and_tpu_on_eight_devices():
  c = _brats()
  assert c.model.dtype == 'bfloat16' and jax.device_count() == 8
  mesh = distributed.mesh()
  for make in (accelerators.abstract_train_step, accelerators.abstract_window_step):
    fn, *args = make(c, mesh, len(c.data.modalities))
    for platform in ('cuda', 'tpu'):
      exp = export.export(fn, platforms=[platform])(*args)
      assert exp.platforms == (platform,) and exp.nr_devices == 8, (make.__name__, platform)
      text = exp.mlir_module()
      assert 'bf16' in text and 'stablehlo.convolution' in text, (make.__name__, platform)
  # the crops cut on the devices (train.crops_on = device) from 20 cases held on each
  fn, *args = accelerators.abstract_crop_cut(c, mesh, 4, (244, 209, 150), 20)
  for platform in ('cuda', 'tpu'):
    exp = export.export(fn, platforms=[platform])(*args)
    assert exp.platforms == (platform,) and exp.nr_devices == 8
    assert exp.out_avals[0].shape[0] == c.train.batch_size  # every key's rows, sharded on data
  fn, state, batch = accelerators.abstract_train_step(c, mesh, 4)
  assert batch['image'].shape == (c.train.batch_size,) + tuple(c.train.crop) + (4,)
  assert 'label_weight' in batch  # brats.py leaves P's symmetric voxels out of the loss


def test_predicted_seconds_by_hand():
  got = accelerators.predicted_seconds(4e15, 9.6e12, 2)
  h200_peak, h200_bw = accelerators.CHIPS['H200']
  assert got['H200'] == (4e15 / (0.4 * h200_peak * 2), 9.6e12 / (h200_bw * 2))
  assert abs(got['H200'][1] - 1.0) < 1e-12  # 9.6 TB over two chips at 4.8 TB/s each
