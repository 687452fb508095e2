"""GMM pseudo-labels: accuracy on a known mixture, degenerate inputs, determinism across workers."""
import numpy as np
import pytest

from cgc_jax.core import config_rules
from cgc_jax.core import paths
from cgc_jax.imaging import geometry
from cgc_jax.imaging import morphology
from cgc_jax.labels import gmm
from cgc_jax.stages import pseudo_labels

from conftest import tiny_config


def _gcfg(**kw):
  """The test config's mixture settings with the spatial rules off (the plain mixture); kw on
  top."""
  c = tiny_config().gmm
  c.open_iterations, c.keep_fraction, c.fill_holes = 0, 0.0, False
  c.min_contrast, c.grow_mm, c.ensemble = float('-inf'), 0.0, ()
  for k, v in kw.items():
    c[k] = v
  return c


def _two_tissue_volume(rng, lesion=True, shape=(30, 30, 30)):
  img = np.zeros(shape + (2,), np.float32)
  brain = np.zeros(shape, bool)
  brain[2:-2, 2:-2, 2:-2] = True
  tissue = rng.integers(0, 3, shape)
  means = np.array([[-1.0, 1.0], [0.0, 0.0], [1.0, -0.5]])
  img[...] = means[tissue] + rng.normal(0, 0.15, shape + (2,))
  gt = np.zeros(shape, bool)
  if lesion:
    gt[10:16, 10:16, 10:16] = True
    img[gt] = [3.0, -1.0] + rng.normal(0, 0.15, (gt.sum(), 2))
  img[~brain] = 0
  return img, brain, gt & brain


def test_recovers_a_bright_lesion():
  img, brain, gt = _two_tissue_volume(np.random.default_rng(0))
  post, p, rep = gmm.pseudo_label(img, brain, [0, 1], 0, _gcfg(k=4), 'case_a')
  assert rep['status'] == 'ok' and rep['converged']
  assert 2 * (p.astype(bool) & gt).sum() / (p.sum() + gt.sum()) > 0.98
  assert post.dtype == np.float32 and p.dtype == np.uint8
  # deterministic for a seed and case id
  post2, _, _ = gmm.pseudo_label(img, brain, [0, 1], 0, _gcfg(k=4), 'case_a')
  np.testing.assert_array_equal(post, post2)


def test_compressed_fit_agrees_with_sklearn_on_every_voxel():
  img, brain, _ = _two_tissue_volume(np.random.default_rng(1), shape=(40, 40, 40))
  cfg = _gcfg(k=4, subsample=5000)
  _, p_sub, rep = gmm.pseudo_label(img, brain, [0, 1], 0, cfg, 'c')
  _, p_full, ref = gmm.pseudo_label(img, brain, [0, 1], 0, cfg, 'c', full_fit=True)
  inter = (p_sub & p_full).sum()
  assert 2 * inter / (p_sub.sum() + p_full.sum()) > 0.999
  assert rep['cells'] < brain.sum() / 5  # the fit saw far fewer points than voxels
  order = np.argsort(np.asarray(ref['means'])[:, 0])
  np.testing.assert_allclose(np.asarray(rep['means'])[order], np.asarray(ref['means'])[order],
                             atol=0.01)


def test_compressed_cells_keep_the_data_moments():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5000, 3)).astype(np.float32) @ np.array(
      [[1, 0.5, 0], [0, 1, 0.2], [0, 0, 2]], np.float32)
  cent, counts, scatter, cell = gmm.compress(x, 8, return_cell=True)
  assert counts.sum() == 5000 and len(counts) < 5000
  x64 = x.astype(np.float64)
  np.testing.assert_allclose((counts[:, None] * cent).sum(0), x64.sum(0), rtol=1e-9)
  second = np.einsum('m,mi,mj->ij', counts, cent, cent) + scatter.sum(0)
  np.testing.assert_allclose(second, x64.T @ x64, rtol=1e-9)
  # one EM step on the cells = the same step on every row, each row weighted by its cell's
  # responsibilities (the only approximation of the compressed fit)
  init = gmm.initial_params(x, 2, 0, 1e-4, 1)
  mix, _, _ = gmm.em(cent, counts, scatter, init, 1e-4, 1, 0.0)
  start = gmm.Mixture(init['weights_init'], init['means_init'],
                      np.linalg.inv(init['precisions_init']))
  r = np.exp(start.log_resp(cent)[0])[cell]  # f64[N, K]
  nk = r.sum(0)
  means = r.T @ x64 / nk[:, None]
  np.testing.assert_allclose(mix.weights_, nk / 5000, rtol=1e-9)
  np.testing.assert_allclose(mix.means_, means, rtol=1e-9)
  for j in range(2):
    d = x64 - means[j]
    cov = (r[:, j, None] * d).T @ d / nk[j] + 1e-4 * np.eye(3)
    np.testing.assert_allclose(mix.covariances_[j], cov, rtol=1e-8)


def test_singular_covariance_raises_regulariser_and_retries():
  # every sample identical in channel 1 and 3 distinct values in channel 0: covariance singular
  x = np.zeros((600, 2), np.float32)
  x[:, 0] = np.repeat([0.0, 1.0, 2.0], 200)
  gm, info = gmm.fit(x, 3, 0, _gcfg(reg_covar=0.0, retries=3))
  assert info['converged']
  assert info['reg_covar'] > 0.0 and 'error' in info['attempts'][0]


def test_no_convergence_is_a_clear_error_naming_the_case():
  img, brain, _ = _two_tissue_volume(np.random.default_rng(2))
  with pytest.raises(gmm.GMMError, match='did not converge after 2 attempts'):
    gmm.pseudo_label(img, brain, [0, 1], 0, _gcfg(max_iter=1, tol=1e-12, retries=1), 'case_x')
  # the stage wraps it with the case id (workers.CaseFailure); here the raw message suffices


def test_fewer_distinct_intensities_than_k():
  img = np.zeros((10, 10, 10, 1), np.float32)
  img[..., 0] = np.random.default_rng(3).integers(0, 2, (10, 10, 10))
  brain = np.ones((10, 10, 10), bool)
  _, p, rep = gmm.pseudo_label(img, brain, [0], 0, _gcfg(k=4), 'c')
  assert 'K lowered 4 -> 2' in rep['k_reduced']
  np.testing.assert_array_equal(p.astype(bool), img[..., 0] == 1)


def test_constant_features_and_tiny_brain_give_empty_p():
  img = np.ones((8, 8, 8, 1), np.float32)
  brain = np.ones((8, 8, 8), bool)
  _, p, rep = gmm.pseudo_label(img, brain, [0], 0, _gcfg(), 'c')
  assert rep['status'] == 'constant_features' and p.sum() == 0
  brain = np.zeros((8, 8, 8), bool)
  brain[0, 0, :5] = True
  _, p, rep = gmm.pseudo_label(img, brain, [0], 0, _gcfg(), 'c')
  assert rep['status'] == 'brain_too_small' and p.sum() == 0


def test_lesion_free_case_is_recorded_not_an_error():
  img, brain, _ = _two_tissue_volume(np.random.default_rng(4), lesion=False)
  _, p, rep = gmm.pseudo_label(img, brain, [0, 1], 0, _gcfg(k=3, rule='hu_range',
                                                            hu_range=(2.5, 9)), 'c')
  assert rep['status'] == 'ok' and rep['lesion_components'] == [] and p.sum() == 0


def test_min_component_size():
  m = np.zeros((10, 10, 10), bool)
  m[0, 0, 0] = True
  m[5:8, 5:8, 5:8] = True
  out = morphology.remove_small(m, 5)
  assert out.sum() == 27 and not out[0, 0, 0]


@pytest.mark.slow
def test_workers_do_not_change_p(tmp_path, tiny_workdir):
  import shutil  # pylint: disable=g-import-not-at-top
  out = {}
  for workers in (1, 2):
    wd = tmp_path / f'w{workers}'
    wd.mkdir()
    shutil.copytree(f'{tiny_workdir}/prepared', wd / 'prepared')
    shutil.copytree(f'{tiny_workdir}/phantoms', wd / 'phantoms')
    c = tiny_config(**{'data.num_workers': workers})
    cases = pseudo_labels.run(c, str(wd))
    s = paths.pl_store(c, str(wd))
    out[workers] = {
        k: (np.asarray(s.read(k, 'p')), np.asarray(s.read(k, 'posterior'))) for k in cases
    }
  assert out[1].keys() == out[2].keys() and len(out[1]) == 3
  for k in out[1]:
    np.testing.assert_array_equal(out[1][k][0], out[2][k][0])
    np.testing.assert_array_equal(out[1][k][1], out[2][k][1])


def test_other_sources(tmp_path, tiny_workdir):
  import shutil  # pylint: disable=g-import-not-at-top
  from cgc_jax.stages import prepare  # pylint: disable=g-import-not-at-top
  wd = tmp_path / 'w'
  wd.mkdir()
  shutil.copytree(f'{tiny_workdir}/prepared', wd / 'prepared')
  shutil.copytree(f'{tiny_workdir}/references', wd / 'references')
  shutil.copytree(f'{tiny_workdir}/phantoms', wd / 'phantoms')
  # ground truth: P equals the prepared label; its NIfTI export equals the original label exactly
  # where no resampling is involved (native grid) -> check through the metrics: Dice 1 on the
  # original grid is not expected at 4 mm, so check the prepared grid instead.
  c = tiny_config(**{'pseudo_labels.source': 'ground_truth'})
  cases = pseudo_labels.run(c, str(wd))
  s = paths.pl_store(c, str(wd))
  prep = paths.prepared_store(c, str(wd))
  refs = paths.reference_store(c, str(wd))
  for k in cases:
    np.testing.assert_array_equal(np.asarray(s.read(k, 'p')), np.asarray(refs.read(k, 'label')))
  # nifti: re-import the ground-truth export, matched by case id, geometry checked
  nifti_dir = wd / 'pseudo_labels' / 'nifti'
  c2 = tiny_config(**{'pseudo_labels.source': 'nifti', 'pseudo_labels.nifti_dir': str(nifti_dir)})
  wd2 = tmp_path / 'w2'
  shutil.copytree(wd / 'prepared', wd2 / 'prepared')
  shutil.copytree(nifti_dir, wd2 / 'masks')
  c2.pseudo_labels.nifti_dir = str(wd2 / 'masks')
  pseudo_labels.run(c2, str(wd2))
  s2 = paths.pl_store(c2, str(wd2))
  for k in cases:
    a, b = np.asarray(s2.read(k, 'p')), np.asarray(s.read(k, 'p'))
    assert 2 * (a & b).sum() / max(a.sum() + b.sum(), 1) > 0.9 or a.sum() + b.sum() == 0
  # threshold source: P is the lesion channel's brain z-score above pseudo_labels.threshold_z
  c3 = tiny_config(**{'pseudo_labels.source': 'threshold'})
  wd3 = tmp_path / 'w3'
  shutil.copytree(wd / 'prepared', wd3 / 'prepared')
  pseudo_labels.run(c3, str(wd3))
  s3 = paths.pl_store(c3, str(wd3))
  marked = 0
  for k in cases:
    image = np.asarray(prep.read(k, 'image'), np.float32)
    brain = np.asarray(prep.read(k, 'brain')) > 0
    flair = image[..., list(c3.data.modalities).index('flair')]
    want = pseudo_labels.threshold_z(flair, brain) > c3.pseudo_labels.threshold_z
    np.testing.assert_array_equal(np.asarray(s3.read(k, 'p')) > 0, want)
    np.testing.assert_array_equal(np.asarray(s3.read(k, 'posterior')), want.astype(np.float16))
    marked += int(want.sum())
  assert marked > 0


def test_labels_from_source_without_a_mixture():
  """threshold: the z-score rule with small components dropped; ground_truth: label > 0; the
  report's lesion fraction counted by hand; an unknown source is named."""
  brain = np.ones((6, 6, 6), bool)
  brain[0] = False  # 180 voxels
  flair = np.zeros((6, 6, 6), np.float32)
  flair[2:4, 2:4, 2:4] = 10.0  # an 8-voxel bright cube
  flair[5, 5, 5] = 10.0  # and a single bright voxel, apart from it
  image = np.stack([flair, np.zeros_like(flair)], -1)
  c = tiny_config(**{'pseudo_labels.source': 'threshold', 'gmm.min_component_voxels': 2})
  post, p, report = pseudo_labels.labels_from_source(c, 'x', image, brain, ['flair', 't1'], None)
  np.testing.assert_array_equal(
      post > 0.5, pseudo_labels.threshold_z(flair, brain) > c.pseudo_labels.threshold_z)
  want = np.zeros((6, 6, 6), np.uint8)
  want[2:4, 2:4, 2:4] = 1  # the single voxel is below min_component_voxels
  np.testing.assert_array_equal(p, want)
  assert report == {'status': 'ok', 'lesion_fraction': 8 / 180}
  label = np.zeros((6, 6, 6), np.uint8)
  label[1, 1, 1:4] = [1, 2, 4]
  c = tiny_config(**{'pseudo_labels.source': 'ground_truth'})
  post, p, report = pseudo_labels.labels_from_source(c, 'x', image, brain, ['flair'], None, label)
  np.testing.assert_array_equal(p, label > 0)
  assert post.dtype == np.float32 and report['lesion_fraction'] == 3 / 180
  with pytest.raises(ValueError, match="unknown pseudo_labels.source 'atlas'"):
    pseudo_labels.labels_from_source(tiny_config(**{'pseudo_labels.source': 'atlas'}), 'x',
                                     image, brain, ['flair'], None)


def test_threshold_method_z_scores_inside_the_brain():
  """The threshold pseudo-labels use a brain z-score, so a CT channel in [0, 1] works like MRI."""
  brain = np.zeros((6, 6, 6), bool)
  brain[1:5, 1:5, 1:5] = True
  x = np.full((6, 6, 6), 0.3, np.float32)
  x[2, 2, 2] = 0.9  # one bright voxel among 64 brain voxels
  x[0, 0, 0] = 5.0  # outside the brain: ignored
  z = pseudo_labels.threshold_z(x, brain)
  v = x[brain]
  np.testing.assert_allclose(z[2, 2, 2], (0.9 - v.mean()) / v.std(), rtol=1e-5)
  assert z[0, 0, 0] == 0 and (z > 2).sum() == 1
  np.testing.assert_allclose(z[brain].mean(), 0, atol=1e-6)
  np.testing.assert_allclose(z[brain].std(), 1, rtol=1e-5)
  assert not pseudo_labels.threshold_z(np.ones((3, 3, 3)), np.ones((3, 3, 3), bool)).any()


def test_ring_contrast_hand_computed():
  x = np.zeros((9, 9, 9), np.float32)
  brain = np.ones((9, 9, 9), bool)
  m = np.zeros_like(brain)
  m[4, 4, 4] = True
  x[4, 4, 4] = 3.0
  x[4, 4, 5] = 1.0  # one of the 6 ring voxels (iterations=1 dilation with the cross)
  assert gmm.ring_contrast(x, m, brain, 1) == pytest.approx(3.0 - 1.0 / 6)
  brain[4, 4, 5] = False  # ring voxels outside the brain do not count
  assert gmm.ring_contrast(x, m, brain, 1) == pytest.approx(3.0)
  assert np.isnan(gmm.ring_contrast(x, np.zeros_like(m), brain, 1))


def test_consistent_posterior_follows_the_cleaned_mask():
  post = np.array([0.9, 0.2, 0.7, 0.0, 0.3], np.float32)
  p = np.array([True, True, False, False, False])  # voxel 1 filled in, voxel 2 removed
  out = gmm.consistent_posterior(post, p, 0.5)
  np.testing.assert_allclose(out, [0.9, 0.51, 0.49, 0.0, 0.3], rtol=1e-6)
  np.testing.assert_array_equal(out > 0.5, p)


def test_cleanup_fills_a_dark_core_and_drops_speckle():
  rng = np.random.default_rng(5)
  img, brain, gt = _two_tissue_volume(rng)
  core = np.zeros_like(gt)
  core[12:14, 12:14, 12:14] = True  # necrotic core: dark inside the bright lesion
  img[core] = [-1.0, 1.0]
  img[20, 20, 20] = [3.0, -1.0]  # a single bright voxel far away
  raw_post, raw_p, _ = gmm.pseudo_label(img, brain, [0, 1], 0, _gcfg(k=4), 'c')
  assert not raw_p[12:14, 12:14, 12:14].any() and raw_p[20, 20, 20]
  post, p, rep = gmm.pseudo_label(img, brain, [0, 1], 0,
                                  _gcfg(k=4, keep_fraction=0.1, fill_holes=True), 'c')
  np.testing.assert_array_equal(p.astype(bool), gt)  # core filled, speckle gone
  np.testing.assert_array_equal(post > 0.5, p.astype(bool))
  assert rep['raw_voxels'] == int(raw_p.sum()) and rep['lesion_voxels'] == int(gt.sum())


def test_no_lesion_evidence_empties_p():
  img, brain, gt = _two_tissue_volume(np.random.default_rng(6), lesion=False)
  # max_mean always names a component: the brightest tissue (FLAIR 1), interleaved voxel by voxel
  # with the other two (-1 and 0), so its ring contrast is 1 - (-1 + 0) / 2 = 1.5; a real lesion
  # (FLAIR 3) inside all three tissues (mean 0) has 3
  _, p0, rep0 = gmm.pseudo_label(img, brain, [0, 1], 0, _gcfg(k=3), 'c')
  assert p0.sum() > 0 and rep0['contrast'] == pytest.approx(1.5, abs=0.05)
  _, p, rep = gmm.consensus(img, brain, ['flair', 't1'],
                              _gcfg(k=3, min_contrast=2.0, channels=('flair', 't1')), 'c',
                              (1, 1, 1))
  assert p.sum() == 0 and rep['status'] == 'no_lesion_evidence'
  img, brain, gt = _two_tissue_volume(np.random.default_rng(6), lesion=True)
  _, p, rep = gmm.consensus(img, brain, ['flair', 't1'],
                              _gcfg(k=4, min_contrast=2.0, channels=('flair', 't1')), 'c',
                              (1, 1, 1))
  assert rep['status'] == 'ok' and rep['contrast'] == pytest.approx(3.0, abs=0.1)
  assert p.sum() > 0.9 * gt.sum()


def _three_channel_volume(seed):
  rng = np.random.default_rng(seed)
  img, brain, gt = _two_tissue_volume(rng)
  third = np.where(gt, 2.0, 0.0) + rng.normal(0, 0.5, gt.shape)  # a noisy third channel
  return np.concatenate([img, third[..., None].astype(np.float32)], -1) * brain[...,
                                                                                None], brain, gt


def test_consensus_is_the_majority_of_its_members():
  img, brain, gt = _three_channel_volume(7)
  mods = ['flair', 't1', 't2']
  members = ('flair,t1:4', 'flair,t2:3', 'flair,t1,t2:4', 'flair,t1ce:4')  # the last: no t1ce
  cfg = _gcfg(ensemble=members, vote=0.5, keep_fraction=0.0, fill_holes=False, grow_mm=0.0,
              lesion_channel='flair')
  post, p, rep = gmm.consensus(img, brain, mods, cfg, 'c', (2.0, 2.0, 2.0))
  assert rep['skipped_members'] == ['flair,t1ce:4'] and len(rep['members']) == 3
  ref_masks, ref_posts = [], []
  for chans, k in [(['flair', 't1'], 4), (['flair', 't2'], 3), (['flair', 't1', 't2'], 4)]:
    mp, mm, _ = gmm.pseudo_label(img, brain, [mods.index(c) for c in chans], 0, _gcfg(k=k), 'c')
    ref_masks.append(mm > 0)
    ref_posts.append(mp)
  want = np.sum(ref_masks, 0) >= 2  # at least half of 3
  np.testing.assert_array_equal(p.astype(bool), want)
  np.testing.assert_array_equal(post > 0.5, want)
  np.testing.assert_allclose(post[want], np.maximum(np.mean(ref_posts, 0)[want], 0.51), rtol=1e-6)
  # growing by 2 mm on a 2 mm grid adds the face neighbours (inside the brain)
  cfg.grow_mm = 2.0
  _, pg, _ = gmm.consensus(img, brain, mods, cfg, 'c', (2.0, 2.0, 2.0))
  np.testing.assert_array_equal(pg.astype(bool), morphology.grow(want, 2.0, (2, 2, 2)) & brain)


def test_consensus_of_one_member_is_the_mixture_itself():
  img, brain, _ = _two_tissue_volume(np.random.default_rng(8))
  post1, p1, rep1 = gmm.pseudo_label(img, brain, [0, 1], 0, _gcfg(k=4), 'c')
  post2, p2, rep2 = gmm.consensus(img, brain, ['flair', 't1'], _gcfg(k=4, channels=('flair', 't1')),
                                  'c', (1, 1, 1))
  np.testing.assert_array_equal(p1, p2)
  np.testing.assert_array_equal(post1, post2)
  assert rep2['means'] == rep1['means'] and rep2['skipped_members'] == []
  with pytest.raises(ValueError, match='t2'):
    gmm.consensus(img, brain, ['flair', 't1'], _gcfg(ensemble=('flair,t2:4',)), 'c', (1, 1, 1))


def test_an_edge_component_leaves_p_and_a_deep_one_stays():
  """gmm.edge_mm: a lesion-bright patch on the brain's outermost layers (what brain extraction
  leaves) is not in P; the lesion deep in the brain stays, voxel for voxel."""
  rng = np.random.default_rng(3)
  img, brain, gt = _two_tissue_volume(rng)
  rim = np.zeros(brain.shape, bool)
  rim[2:4, 6:12, 6:12] = True  # the two outer layers of one face
  img[rim] = [3.0, -1.0] + rng.normal(0, 0.15, (rim.sum(), 2))
  cfg = _gcfg(k=4, channels=('flair', 't1'))
  _, p0, _ = gmm.consensus(img, brain, ['flair', 't1'], cfg, 'c', (2.0, 2.0, 2.0))
  assert (p0.astype(bool) & rim).sum() > 0.9 * rim.sum()  # without the rule the rim is "lesion"
  cfg.edge_mm = 4.0
  _, p1, _ = gmm.consensus(img, brain, ['flair', 't1'], cfg, 'c', (2.0, 2.0, 2.0))
  np.testing.assert_array_equal(p1.astype(bool), p0.astype(bool) & ~rim)
  assert (p1.astype(bool) & gt).sum() > 0.95 * gt.sum()


def test_histogram_standardisation_maps_the_landmarks_onto_the_standard():
  rng = np.random.default_rng(5)
  img = rng.gamma(2.0, 1.0, (12, 12, 12, 2)).astype(np.float32)
  brain = np.zeros((12, 12, 12), bool)
  brain[1:-1, 1:-1, 1:-1] = True
  marks = gmm.landmarks(img, brain)
  np.testing.assert_allclose(marks[1], np.percentile(img[brain][:, 1], gmm.LANDMARKS))
  # onto its own landmarks: unchanged (0 outside the brain); onto 3 x + 2: every voxel 3 x + 2,
  # beyond the outer landmarks too (the outer segments extended)
  same = gmm.standardise(img, brain, marks, marks)
  np.testing.assert_allclose(same[brain], img[brain], atol=1e-4)
  assert not same[~brain].any()
  np.testing.assert_allclose(gmm.standardise(img, brain, marks, 3 * marks + 2)[brain],
                             3 * img[brain] + 2, atol=1e-3)
  # piecewise: the case's median lands on the standard's median
  std = np.stack([np.linspace(-2, 2, len(gmm.LANDMARKS))] * 2)
  out = gmm.standardise(img, brain, marks, std)
  np.testing.assert_allclose(np.median(out[brain], axis=0), std[:, 5], atol=0.05)


@pytest.mark.slow  # the pseudo-label stage and a consensus on the tiny cases
def test_a_standardised_run_records_its_standard_and_redoes_p_when_it_changes(tiny_workdir,
                                                                               tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  wd = tmp_path / 'w'
  wd.mkdir()
  for d in ('prepared', 'references', 'phantoms'):
    shutil.copytree(f'{tiny_workdir}/{d}', wd / d)
  c = tiny_config(**{'gmm.standardise': True})
  cases = pseudo_labels.run(c, str(wd))
  s = paths.pl_store(c, str(wd))
  digests = {s.meta(k)['inputs']['standard'] for k in cases}
  assert len(digests) == 1 and len(cases) == 3
  prep = paths.prepared_store(c, str(wd))
  standard = pseudo_labels.standard_landmarks(c, prep, s, cases)
  want = np.mean([gmm.landmarks(np.asarray(prep.read(k, 'image'), np.float32),
                                np.asarray(prep.read(k, 'brain')) > 0) for k in cases], axis=0)
  np.testing.assert_allclose(standard, want)
  # P of the first case from its standardised image, by hand
  k = cases[0]
  image = np.asarray(prep.read(k, 'image'), np.float32)
  brain = np.asarray(prep.read(k, 'brain')) > 0
  geom = geometry.Geometry.from_json(prep.meta(k)['geometry'])
  _, p, _ = gmm.consensus(gmm.standardise(image, brain, gmm.landmarks(image, brain), standard),
                          brain, list(prep.meta(k)['modalities']), c.gmm, k, geom.spacing)
  np.testing.assert_array_equal(np.asarray(s.read(k, 'p')), p)
  # two of the three cases: another standard, so every P is redone
  assert pseudo_labels.standard_landmarks(c, prep, s, cases[:2]).tolist() != standard.tolist()


def test_signature_rule_picks_among_the_lesion_bright_components_by_weighted_means():
  """rule 'signature': the components of lesion-channel mean above 0 (the brain's average in
  z-scores) compete on sum(weight x mean); CSF (dark FLAIR, bright T2) never wins however bright
  its T2; no bright component falls back to max_mean."""
  # components x (flair, t1, t2): oedema, enhancing core, CSF, white matter
  means = np.array([[0.9, -0.2, 0.8], [0.6, -1.4, 1.0], [-1.8, -3.0, 3.5], [-0.2, 0.8, -0.6]])
  names = ['flair', 't1', 't2']
  g = _gcfg(rule='signature', signature=('flair:1', 't2:1', 't1:-1'))
  # scores of the FLAIR-bright ones: 0.9 + 0.2 + 0.8 = 1.9 and 0.6 + 1.4 + 1.0 = 3.0
  assert gmm.lesion_components(means, g, 0, None, names) == [1]
  assert gmm.lesion_components(means, _gcfg(rule='max_mean'), 0) == [0]
  # FLAIR alone: the brightest one, as max_mean; a channel the signature does not name weighs 0
  assert gmm.lesion_components(means, _gcfg(rule='signature', signature=('flair:1',)), 0, None,
                               names) == [0]
  assert gmm.lesion_components(means[:, :2], _gcfg(rule='signature', signature=(
      'flair:1', 't2:5', 't1:-1')), 0, None, names[:2]) == [1]  # 0.6 + 1.4 > 0.9 + 0.2
  # no component brighter than average in FLAIR: the brightest (-1.1), though the signature
  # would take component 2 (-3.8 + 3.0 + 3.5)
  dark = means - [2.0, 0, 0]
  assert gmm.lesion_components(dark, g, 0, None, names) == [0]
  with pytest.raises(ValueError, match='channel:weight'):
    config_rules.parse_signature(('flair=1',))
  with pytest.raises(ValueError, match='for MRI'):
    gmm.lesion_components(means, g, 0, (0.0, 100.0), names)


def test_signature_rule_through_the_consensus_names_each_members_channels():
  """Each member of the consensus scores its components with its own channels' weights: on a
  volume whose FLAIR-brightest tissue is also T1-bright (a rim) and whose lesion is T1-dark, FLAIR
  - T1 marks the lesion where max_mean marks the rim."""
  rng = np.random.default_rng(3)
  shape = (30, 30, 30)
  brain = np.zeros(shape, bool)
  brain[2:-2, 2:-2, 2:-2] = True
  tissue = rng.integers(0, 2, shape)
  img = np.asarray([[-1.0, 0.0], [0.0, 1.0]], np.float32)[tissue]
  lesion = np.zeros(shape, bool)
  lesion[8:14, 8:14, 8:14] = True
  rim = np.zeros(shape, bool)
  rim[18:26, 18:26, 18:26] = True
  img[lesion] = [1.5, -2.0]
  img[rim] = [2.0, 2.0]
  img = img + rng.normal(0, 0.1, img.shape).astype(np.float32)
  img[~brain] = 0
  kw = dict(k=4, channels=('flair', 't1'), ensemble=('flair,t1:4',))
  _, p_max, _ = gmm.consensus(img, brain, ['flair', 't1'], _gcfg(**kw), 'c', (1, 1, 1))
  _, p_sig, rep = gmm.consensus(
      img, brain, ['flair', 't1'],
      _gcfg(rule='signature', signature=('flair:1', 't1:-1'), **kw), 'c', (1, 1, 1))
  assert (p_max.astype(bool) & rim).sum() > 0.9 * (rim & brain).sum() and not p_max[lesion].any()
  assert (p_sig.astype(bool) & lesion).sum() > 0.9 * lesion.sum() and not p_sig[rim].any()
  assert rep['members'][0]['channels'] == ['flair', 't1']
