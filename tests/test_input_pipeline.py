import numpy as np

from cgc_jax import input_pipeline
from cgc_jax import paths

from conftest import tiny_config


def _sampler(wd, cfg, pi=0, pc=1):
  prep = paths.prepared_store(cfg, wd)
  pl = paths.pl_store(cfg, wd)
  return input_pipeline.CropSampler(prep, pl, pl.complete_cases(), cfg.train, True, pi, pc)


def test_deterministic_and_process_sharded(tiny_workdir):
  cfg = tiny_config()
  a = _sampler(tiny_workdir, cfg).local_batch(5)
  b = _sampler(tiny_workdir, cfg).local_batch(5)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert a['image'].shape == (8, 16, 16, 16, 4) and a['p'].shape == (8, 16, 16, 16)
  # two processes' local batches are the halves of the one-process global batch
  halves = [_sampler(tiny_workdir, cfg, i, 2).local_batch(5) for i in range(2)]
  for k in a:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), a[k])
  # each process opened only the cases its own slots drew
  for i in range(2):
    h = _sampler(tiny_workdir, cfg, i, 2)
    h.local_batch(5)
    drawn = {h.case_ids.index(c) for c in h.case_ids_of(5)[i * 4:(i + 1) * 4]}
    assert set(h._cases) == drawn
  # another step differs
  assert not np.array_equal(_sampler(tiny_workdir, cfg).local_batch(6)['image'], a['image'])


def test_iterator_resumes_exactly(tiny_workdir):
  cfg = tiny_config()
  s = _sampler(tiny_workdir, cfg)
  full = list(s.iterate(0, 5))
  resumed = list(_sampler(tiny_workdir, cfg).iterate(3, 5))
  assert [x[0] for x in resumed] == [3, 4]
  for (_, x), (_, y) in zip(full[3:], resumed):
    np.testing.assert_array_equal(x['image'], y['image'])


def test_padding_and_foreground_sampling(tiny_workdir):
  cfg = tiny_config(**{'train.crop': (64, 64, 64), 'train.fg_fraction': 1.0, 'train.batch_size': 4,
                       'train.flip': False, 'train.intensity_scale': 0.0,
                       'train.intensity_shift': 0.0})
  s = _sampler(tiny_workdir, cfg)
  b = s.local_batch(0)
  assert b['image'].shape[1:4] == (64, 64, 64)  # cases are smaller: zero-padded
  assert np.all(b['image'][b['brain'] == 0] == 0)
  # no flips, no jitter, crop larger than every case: each crop holds its whole case, unchanged
  for j, cid in enumerate(s.case_ids_of(0)):
    image, p, brain, _, _ = s._case(s.case_ids.index(cid))
    assert b['brain'][j].sum() == np.asarray(brain).sum() > 0
    assert b['p'][j].sum() == np.asarray(p).sum()
    np.testing.assert_allclose(np.sort(b['image'][j][b['brain'][j] > 0][:, 0]),
                               np.sort(np.asarray(image, np.float32)[np.asarray(brain) > 0][:, 0]))
  lesion_cases = [i for i in range(len(s.case_ids)) if len(s._case(i)[3])]
  assert lesion_cases
  for step in range(3):
    for j, cid in enumerate(s.case_ids_of(step)):
      if len(s._case(s.case_ids.index(cid))[3]):
        assert s.local_batch(step)['p'][j].sum() > 0  # fg_fraction 1: every lesion case shows P
  cfg0 = tiny_config(**{'train.fg_fraction': 0.0})
  assert _sampler(tiny_workdir, cfg0).local_batch(0)['p'].shape == (8, 16, 16, 16)


def test_posterior_crops_follow_p_when_confidence_weights_are_on(tiny_workdir):
  cfg = tiny_config(**{'train.confidence_gamma': 1.0})
  batch = _sampler(tiny_workdir, cfg).local_batch(3)
  plain = _sampler(tiny_workdir, tiny_config()).local_batch(3)
  assert 'posterior' not in plain and batch['posterior'].shape == batch['p'].shape
  for k in plain:  # the extra array changes nothing else
    np.testing.assert_array_equal(plain[k], batch[k])
  # P is the posterior above gmm.threshold: the two crops share position and flips voxel for voxel
  assert batch['p'].sum() > 0
  np.testing.assert_array_equal(batch['posterior'] > cfg.gmm.threshold, batch['p'] > 0)
