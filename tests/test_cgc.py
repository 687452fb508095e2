"""CGC losses against plain NumPy references (1e-5), and their edge cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgc_jax.model import cgc


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_seg_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 4, 4, 2)).astype(np.float32)
  p = (rng.random((2, 4, 4, 4)) > 0.7).astype(np.float32)
  w = (rng.random((2, 4, 4, 4)) > 0.3).astype(np.float32)
  lp = _np_log_softmax(logits.astype(np.float64))
  ce = -(p * lp[..., 1] + (1 - p) * lp[..., 0])
  want = (w * ce).sum() / w.sum()
  assert float(cgc.seg_loss(logits, p, w)) == pytest.approx(want, abs=1e-5)
  prob = np.exp(lp[..., 1]) * w
  inter = (prob * p * w).sum((1, 2, 3))
  den = prob.sum((1, 2, 3)) + (p * w).sum((1, 2, 3))
  want_d = np.mean(1 - (2 * inter + 1) / (den + 1))
  assert float(cgc.soft_dice_loss(logits, p, w)) == pytest.approx(want_d, abs=1e-5)


def test_gce_loss_matches_numpy_and_tends_to_ce():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 4, 4, 2)).astype(np.float32)
  p = (rng.random((2, 4, 4, 4)) > 0.7).astype(np.float32)
  w = (rng.random((2, 4, 4, 4)) > 0.3).astype(np.float32)
  prob = np.exp(_np_log_softmax(logits.astype(np.float64)))
  for q in (0.3, 0.7, 1.0):
    per = p * (1 - prob[..., 1]**q) / q + (1 - p) * (1 - prob[..., 0]**q) / q
    want = (w * per).sum() / w.sum()
    assert float(cgc.gce_loss(logits, p, w, q)) == pytest.approx(want, abs=1e-5)
  # q = 1 is the mean absolute error 1 - prob(label); small q approaches cross-entropy
  mae = (w * (1 - np.where(p > 0, prob[..., 1], prob[..., 0]))).sum() / w.sum()
  assert float(cgc.gce_loss(logits, p, w, 1.0)) == pytest.approx(mae, abs=1e-5)
  ce = float(cgc.seg_loss(logits, p, w))
  assert float(cgc.gce_loss(logits, p, w, 1e-3)) == pytest.approx(ce, rel=2e-3)


def test_corrected_target_takes_the_networks_sure_decisions_only_when_active():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (2, 4, 3, 2, 2)).astype(np.float32)
  p = (rng.random((2, 4, 3, 2)) > 0.5).astype(np.float32)
  prob = np.exp(logits[..., 1]) / np.exp(logits).sum(-1)
  want = np.where(prob > 0.8, 1.0, np.where(prob < 0.2, 0.0, p))
  assert 0 < (want != p).sum() < p.size  # some labels flipped, not all
  got = cgc.corrected_target(jnp.asarray(logits), jnp.asarray(p), 0.8, jnp.asarray(True))
  np.testing.assert_array_equal(np.asarray(got), want)
  off = cgc.corrected_target(jnp.asarray(logits), jnp.asarray(p), 0.8, jnp.asarray(False))
  np.testing.assert_array_equal(np.asarray(off), p)
  g = jax.grad(lambda x: cgc.corrected_target(x, jnp.asarray(p), 0.8, True).sum())(
      jnp.asarray(logits))
  assert not np.any(np.asarray(g))  # a constant target


def test_bootstrap_target_and_confidence_weight():
  logits = np.zeros((1, 2, 1, 1, 2), np.float32)
  logits[0, 0, 0, 0] = (2.0, -1.0)  # network says normal
  logits[0, 1, 0, 0] = (-1.0, 2.0)  # network says lesion
  p = np.array([1.0, 1.0], np.float32).reshape(1, 2, 1, 1)
  got = np.asarray(cgc.bootstrap_target(jnp.asarray(logits), jnp.asarray(p), 0.2)).ravel()
  np.testing.assert_allclose(got, [0.8, 1.0])
  g = jax.grad(lambda x: cgc.bootstrap_target(x, jnp.asarray(p), 0.2).sum())(jnp.asarray(logits))
  assert not np.any(np.asarray(g))  # the network's own decision is a constant target
  post = np.array([0.0, 0.25, 0.5, 0.9, 1.0], np.float32)
  np.testing.assert_allclose(np.asarray(cgc.confidence_weight(post, 2.0)),
                             [1.0, 0.25, 0.0, 0.64, 1.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(cgc.confidence_weight(post, 0.0)), np.ones(5))


def test_elr_loss_matches_numpy_and_pulls_towards_the_teacher():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 3, 3, 3, 2)).astype(np.float32)
  teacher = rng.normal(size=(2, 3, 3, 3, 2)).astype(np.float32)
  w = (rng.random((2, 3, 3, 3)) > 0.3).astype(np.float32)

  def probs(x):
    pr = np.clip(np.exp(_np_log_softmax(x.astype(np.float64))), 1e-4, 1 - 1e-4)
    return pr / pr.sum(-1, keepdims=True)
  want = (w * np.log(1 - (probs(logits) * probs(teacher)).sum(-1))).sum() / w.sum()
  assert float(cgc.elr_loss(logits, teacher, w)) == pytest.approx(want, abs=1e-5)
  # a target scaled by s (the paper's zero-started moving average): log(1 - s <p, t>)
  want = (w * np.log(1 - 0.3 * (probs(logits) * probs(teacher)).sum(-1))).sum() / w.sum()
  assert float(cgc.elr_loss(logits, teacher, w, 0.3)) == pytest.approx(want, abs=1e-5)
  # its gradient moves the logits towards the teacher's decision and none flows to the teacher
  t = np.zeros((1, 1, 1, 1, 2), np.float32)
  t[..., 1] = 4.0  # teacher: lesion
  x = np.zeros((1, 1, 1, 1, 2), np.float32)
  one = np.ones((1, 1, 1, 1), np.float32)
  g = np.asarray(jax.grad(lambda a: cgc.elr_loss(a, jnp.asarray(t), one))(jnp.asarray(x)))
  assert g[..., 1] < 0 < g[..., 0]  # descent raises the lesion logit
  gt = jax.grad(lambda b: cgc.elr_loss(jnp.asarray(x), b, one))(jnp.asarray(t))
  assert not np.any(np.asarray(gt))
  # a confident teacher and a network that agrees: the log is bounded by the clipping
  assert float(cgc.elr_loss(t, t, one)) > np.log(1e-4) - 1e-3


def _np_region(feats, lesion, normal):
  b, d = feats.shape[0], feats.shape[-1]
  vecs, labels, valid = [], [], []
  for i in range(b):
    f = feats[i].reshape(-1, d)
    for lab, m in ((0, normal[i].ravel()), (1, lesion[i].ravel())):
      vecs.append(f[m].mean(0) if m.any() else np.zeros(d))
      labels.append(lab)
      valid.append(m.any())
  return np.array(vecs), np.array(labels), np.array(valid)


def _np_coarse(logits, labels, valid):
  lp = _np_log_softmax(logits)
  nll = -lp[np.arange(len(labels)), labels]
  return nll[valid].mean() if valid.any() else 0.0


def test_coarse_matches_numpy_including_lesion_free_crop():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(3, 4, 4, 2, 5))
  p = np.zeros((3, 16, 16, 8), np.float32)
  p[0, :8, :8] = 1  # lesion in crop 0
  p[1, 4:, :, :4] = 1
  # crop 2: no lesion cell at all -> contributes its normal vector only
  brain = np.ones_like(p)
  brain[:, :, :, 6:] = 0
  lesion, normal = cgc.cell_masks(jnp.asarray(p), jnp.asarray(brain), (4, 4, 2), 0.5, True)
  vecs, labels, valid = cgc.region_vectors(jnp.asarray(feats, jnp.float32), lesion, normal)
  v_np, l_np, ok_np = _np_region(feats, np.asarray(lesion), np.asarray(normal))
  np.testing.assert_allclose(np.asarray(vecs).reshape(-1, 5)[ok_np], v_np[ok_np], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(valid).ravel(), ok_np)
  assert not bool(valid[2, 1]) and bool(valid[2, 0])
  w = rng.normal(size=(5, 2))
  logits = np.asarray(vecs).reshape(-1, 5) @ w
  got = cgc.coarse_loss(jnp.asarray(logits, jnp.float32), labels.reshape(-1), valid.reshape(-1))
  assert float(got) == pytest.approx(_np_coarse(logits, l_np, ok_np), abs=1e-5)


def _np_anchor_losses(z, labels, valid, tau, need_negative=False):
  """Loop reference: the SupCon loss of every anchor among the vectors z (one group)."""
  n = len(z)
  sim = z @ z.T / tau
  losses = []
  for i in range(n):
    if not valid[i]:
      continue
    others = [a for a in range(n) if a != i and valid[a]]
    pos = [a for a in others if labels[a] == labels[i]]
    neg = [a for a in others if labels[a] != labels[i]]
    if not pos or (need_negative and not neg):
      continue
    denom = np.log(np.sum(np.exp(sim[i, others])))
    losses.append(-np.mean([sim[i, p] - denom for p in pos]))
  return losses


def _np_supcon(z, labels, valid, tau):
  losses = _np_anchor_losses(z, labels, valid, tau)
  return np.mean(losses) if losses else 0.0


def test_supcon_matches_numpy():
  rng = np.random.default_rng(2)
  for n, tau in [(10, 0.2), (17, 0.07), (6, 0.9)]:
    z = rng.normal(size=(n, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = rng.integers(0, 2, n)
    valid = rng.random(n) > 0.2
    got = cgc.supcon_loss(jnp.asarray(z, jnp.float32), jnp.asarray(labels), jnp.asarray(valid), tau)
    assert float(got) == pytest.approx(_np_supcon(z, labels, valid, tau), abs=1e-5)


def test_patch_vectors_match_numpy_with_partial_patches():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(2, 5, 4, 3, 6)).astype(np.float32)  # 5x4x3 grid, patch 2x2x2: partial
  lesion = rng.random((2, 5, 4, 3)) > 0.6
  normal = ~lesion & (rng.random((2, 5, 4, 3)) > 0.2)
  vecs, labels, valid = cgc.patch_vectors(jnp.asarray(feats), jnp.asarray(lesion),
                                          jnp.asarray(normal), (2, 2, 2))
  want = []
  for b in range(2):
    for i in range(0, 5, 2):
      for j in range(0, 4, 2):
        for k in range(0, 3, 2):
          sl = (b, slice(i, i + 2), slice(j, j + 2), slice(k, k + 2))
          for lab, m in ((0, normal[sl]), (1, lesion[sl])):
            f = feats[sl].reshape(-1, 6)[m.ravel()]
            want.append((f.mean(0) if len(f) else np.zeros(6), lab, len(f) > 0))
  np.testing.assert_array_equal(np.asarray(labels), [w[1] for w in want])
  np.testing.assert_array_equal(np.asarray(valid), [w[2] for w in want])
  np.testing.assert_allclose(np.asarray(vecs), np.stack([w[0] for w in want]), atol=1e-5)


def _np_local_supcon(z, labels, valid, tau):
  """Per mini-patch g, anchors with a positive and a negative in g."""
  losses = [l for g in range(z.shape[0])
            for l in _np_anchor_losses(z[g], labels[g], valid[g], tau, need_negative=True)]
  return np.mean(losses) if losses else 0.0


def test_local_supcon_matches_numpy_and_ignores_other_mini_patches():
  rng = np.random.default_rng(5)
  for g, k, tau in [(3, 8, 0.2), (5, 12, 0.07)]:
    z = rng.normal(size=(g, k, 6))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    labels = rng.integers(0, 2, (g, k))
    labels[0] = 0  # one mini-patch of one class: no anchors there
    valid = rng.random((g, k)) > 0.2
    got = cgc.local_supcon_loss(jnp.asarray(z, jnp.float32), jnp.asarray(labels),
                                jnp.asarray(valid), tau)
    want = _np_local_supcon(z, labels, valid, tau)
    assert want > 0
    assert float(got) == pytest.approx(want, abs=1e-5)
  # moving a one-class mini-patch's cells changes nothing: it neither anchors nor gives negatives
  z2 = z.copy()
  z2[0] = z2[0][::-1]
  got2 = cgc.local_supcon_loss(jnp.asarray(z2, jnp.float32), jnp.asarray(labels),
                               jnp.asarray(valid), tau)
  assert float(got2) == pytest.approx(float(got), abs=1e-6)
  # no mini-patch holds both classes: 0, with finite gradients
  f = lambda z: cgc.local_supcon_loss(z, jnp.zeros((g, k), int), jnp.ones((g, k), bool), tau)
  assert float(f(jnp.asarray(z, jnp.float32))) == 0.0
  assert np.all(np.isfinite(np.asarray(jax.grad(f)(jnp.asarray(z, jnp.float32)))))


def test_supcon_floor_is_reached_by_perfect_clusters_and_bounds_random_ones():
  rng = np.random.default_rng(7)
  tau = 0.2
  labels = rng.integers(0, 2, (4, 10))
  labels[:, 0], labels[:, 1] = 0, 1  # both classes in every group
  valid = rng.random((4, 10)) > 0.2
  valid[:, :2] = True
  e = np.zeros((2, 5))
  e[0, 0], e[1, 0] = 1.0, -1.0  # each class at one point, the two classes opposite
  perfect = jnp.asarray(e[labels], jnp.float32)
  lab, val = jnp.asarray(labels), jnp.asarray(valid)
  for loss, args in ((cgc.local_supcon_loss, (lab, val)),
                     (cgc.supcon_loss, (lab.reshape(-1), val.reshape(-1)))):
    z = perfect if loss is cgc.local_supcon_loss else perfect.reshape(-1, 5)
    floor = float(cgc.supcon_floor(*args, tau))
    assert float(loss(z, *args, tau)) == pytest.approx(floor, abs=1e-4)
    for _ in range(3):
      r = rng.normal(size=z.shape)
      r /= np.linalg.norm(r, axis=-1, keepdims=True)
      assert float(loss(jnp.asarray(r, jnp.float32), *args, tau)) > floor + 0.1
  # global: log(n_pos) when negatives are negligible (hand value for 3 + 2 valid vectors)
  got = cgc.supcon_floor(jnp.array([0, 0, 0, 1, 1]), jnp.ones(5, bool), 0.2)
  want = (3 * np.log(2 + 2 * np.exp(-10)) + 2 * np.log(1 + 3 * np.exp(-10))) / 5
  assert float(got) == pytest.approx(want, abs=1e-6)


def test_patch_cells_match_a_loop_with_partial_patches():
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(2, 5, 4, 3, 6)).astype(np.float32)  # 5x4x3 grid, patch 2x2x2: partial
  lesion = rng.random((2, 5, 4, 3)) > 0.6
  normal = ~lesion & (rng.random((2, 5, 4, 3)) > 0.2)
  cells, labels, valid = cgc.patch_cells(jnp.asarray(feats), jnp.asarray(lesion),
                                         jnp.asarray(normal), (2, 2, 2))
  assert cells.shape == (2 * 3 * 2 * 2, 8, 6)
  g = 0
  for b in range(2):
    for i in range(0, 6, 2):
      for j in range(0, 4, 2):
        for k in range(0, 4, 2):
          c = 0
          for di in range(2):
            for dj in range(2):
              for dk in range(2):
                x, y, zz = i + di, j + dj, k + dk
                inside = x < 5 and y < 4 and zz < 3
                want_f = feats[b, x, y, zz] if inside else np.zeros(6)
                want_l = int(lesion[b, x, y, zz]) if inside else 0
                want_v = bool(lesion[b, x, y, zz] or normal[b, x, y, zz]) if inside else False
                np.testing.assert_allclose(np.asarray(cells[g, c]), want_f, atol=1e-6)
                assert int(labels[g, c]) == want_l and bool(valid[g, c]) == want_v
                c += 1
          g += 1


def test_edge_cases_are_finite_with_finite_gradients():
  z = jnp.ones((4, 8)) / np.sqrt(8)
  # no positive pairs: every label distinct among valid vectors
  assert float(cgc.supcon_loss(z, jnp.array([0, 1, 0, 1]), jnp.array([True, True, False, False]),
                               0.2)) == 0.0
  # nothing valid at all
  assert float(cgc.supcon_loss(z, jnp.zeros(4, int), jnp.zeros(4, bool), 0.2)) == 0.0
  assert float(cgc.coarse_loss(jnp.zeros((3, 2)), jnp.zeros(3, int), jnp.zeros(3, bool))) == 0.0
  # a mini-patch with one class only, and a lesion-free batch: gradients stay finite
  feats = jnp.asarray(np.random.default_rng(4).normal(size=(1, 2, 2, 2, 4)), jnp.float32)

  def f(feats):
    lesion = jnp.zeros((1, 2, 2, 2), bool)
    vecs, labels, valid = cgc.patch_vectors(feats, lesion, ~lesion, (2, 2, 2))
    vecs = vecs * jax.lax.rsqrt(jnp.maximum(jnp.sum(vecs * vecs, -1, keepdims=True), 1e-12))
    return cgc.supcon_loss(vecs, labels, valid, 0.2)
  g = jax.grad(f)(feats)
  assert np.all(np.isfinite(np.asarray(g)))


def test_cell_fraction_and_cell_masks_against_a_loop_over_cells():
  rng = np.random.default_rng(3)
  p = (rng.random((2, 8, 12, 6)) > 0.6).astype(np.float32)
  brain = (rng.random((2, 8, 12, 6)) > 0.3).astype(np.float32)
  brain[1, :4] = 0  # outside the brain: neither lesion (if P says so) nor normal
  grid, thr = (4, 3, 2), 0.4
  frac = np.asarray(cgc.cell_fraction(jnp.asarray(p), grid))
  lesion, normal = (np.asarray(a) for a in cgc.cell_masks(jnp.asarray(p), jnp.asarray(brain), grid,
                                                          thr, True))
  _, normal_all = cgc.cell_masks(jnp.asarray(p), jnp.asarray(brain), grid, thr, False)
  s = (2, 4, 3)  # cell size in voxels
  for b in range(2):
    for i in range(4):
      for j in range(3):
        for k in range(2):
          block = (b, slice(i * s[0], (i + 1) * s[0]), slice(j * s[1], (j + 1) * s[1]),
                   slice(k * s[2], (k + 1) * s[2]))
          want = p[block].mean()
          assert frac[b, i, j, k] == pytest.approx(want, abs=1e-6)
          assert lesion[b, i, j, k] == (want >= thr)
          assert normal[b, i, j, k] == ((want < thr) and brain[block].mean() >= 0.5)
          assert bool(normal_all[b, i, j, k]) == (want < thr)
  assert lesion.any() and normal.any() and (~lesion & ~normal).any()  # all three kinds occur
