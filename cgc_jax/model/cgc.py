"""Losses of the cross-granularity contrastive (CGC) method, as pure jnp functions.

Notation: B crops; F: f32[B, x, y, z, D] the U-Net bottleneck; P pooled to F's grid gives each
cell's lesion fraction; a cell is lesion when fraction >= cell_threshold, normal when not lesion
(and, with normal_in_brain, mostly inside the brain). All reductions are over the GLOBAL batch:
under jit with a sharded batch, XLA gathers what each loss needs, so every device's vectors are
negatives for all.
"""
import jax
import jax.numpy as jnp


def seg_loss(logits, p, weight):
  """Voxel cross-entropy against P.

  logits: f32[B, X, Y, Z, 2]; p: f32[B, X, Y, Z] in {0, 1}; weight: f32[B, X, Y, Z] (1 where the
  loss counts, e.g. the brain). Returns sum(weight * CE) / max(sum(weight), 1).
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -(p * logp[..., 1] + (1.0 - p) * logp[..., 0])
  return jnp.sum(weight * ce) / jnp.maximum(jnp.sum(weight), 1.0)


def gce_loss(logits, p, weight, q: float):
  """Generalised cross-entropy (Zhang & Sabuncu 2018) against P: robust to wrong labels.

  Same contract as seg_loss; per voxel p * (1 - prob_1^q) / q + (1 - p) * (1 - prob_0^q) / q, which
  tends to cross-entropy as q -> 0 and to the (bounded, noise-tolerant) MAE at q = 1.
  """
  prob = jax.nn.softmax(logits, axis=-1)
  l1 = (1.0 - jnp.power(prob[..., 1] + 1e-7, q)) / q
  l0 = (1.0 - jnp.power(prob[..., 0] + 1e-7, q)) / q
  loss = p * l1 + (1.0 - p) * l0
  return jnp.sum(weight * loss) / jnp.maximum(jnp.sum(weight), 1.0)


def bootstrap_target(logits, p, beta: float):
  """Hard bootstrapping (Reed et al. 2015): target = (1 - beta) * P + beta * the network's own hard
  decision, held constant (no gradient). logits f32[B, X, Y, Z, 2], p f32[B, X, Y, Z] -> same as p.
  """
  own = jax.lax.stop_gradient((logits[..., 1] > logits[..., 0]).astype(p.dtype))
  return (1.0 - beta) * p + beta * own


def corrected_target(logits, p, threshold: float, active):
  """ADELE-style target correction (Liu et al. 2022): where the network is sure (its lesion
  probability above `threshold` or below 1 - `threshold`) the target is its own decision, elsewhere
  P; P everywhere while `active` is False. Held constant (no gradient).

  logits f32[B, X, Y, Z, 2]; p f32[B, X, Y, Z] in {0, 1}; threshold in (0.5, 1); active bool[]
  (from train.correct_start of the steps on) -> f32[B, X, Y, Z]. Where P is wrong and the network
  has learned otherwise before it memorised P (a false lesion it never marks, a core P leaves out
  that it marks), the label stops pulling it back.
  """
  prob = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1)[..., 1])
  own = jnp.where(prob > threshold, 1.0, jnp.where(prob < 1.0 - threshold, 0.0, p))
  return jnp.where(active, own, p)  # own has p's dtype (the constants are weakly typed)


def confidence_weight(posterior, gamma: float):
  """Voxel weight |2 * posterior - 1| ** gamma: 1 where the mixture is sure, 0 where it is 50/50.
  posterior f32[...] in [0, 1] -> f32[...]."""
  return jnp.power(jnp.abs(2.0 * posterior - 1.0), gamma)


def elr_loss(logits, teacher_logits, weight, target_scale=1.0, clip: float = 1e-4):
  """Early-learning regularisation (Liu et al. 2020): mean of log(1 - <prob, target>) over the
  voxels, the target being target_scale times the teacher's class probabilities (held constant).
  Minimising it pulls the network towards what it predicted while it was still learning the easy,
  mostly right part of P, against fitting P's errors later.

  logits, teacher_logits: f32[B, X, Y, Z, 2]; weight: f32[B, X, Y, Z]; target_scale: f32[] in
  [0, 1] (the paper's targets start at zero and grow as a moving average: 1 - decay**step). Both
  probabilities are clipped to [clip, 1 - clip] and renormalised, as in the paper's code, which
  bounds the log. Returns sum(weight * log(1 - <prob, target>)) / max(sum(weight), 1) (<= 0).
  """
  def probs(x):
    pr = jnp.clip(jax.nn.softmax(x, axis=-1), clip, 1.0 - clip)
    return pr / pr.sum(-1, keepdims=True)
  target = jax.lax.stop_gradient(target_scale * probs(teacher_logits))
  inner = jnp.sum(probs(logits) * target, axis=-1)
  reg = jnp.log(1.0 - inner)
  return jnp.sum(weight * reg) / jnp.maximum(jnp.sum(weight), 1.0)


def soft_dice_loss(logits, p, weight, smooth: float = 1.0):
  """1 - soft Dice of the lesion probability against P, per crop, averaged over the batch.

  Same contract as seg_loss. Balances the rare lesion class against the brain background (the
  nnU-Net default adds it to cross-entropy); crops without lesion or prediction give ~0.
  """
  prob = jax.nn.softmax(logits, axis=-1)[..., 1] * weight
  tgt = p * weight
  axes = tuple(range(1, p.ndim))
  inter = jnp.sum(prob * tgt, axes)
  denom = jnp.sum(prob, axes) + jnp.sum(tgt, axes)
  return jnp.mean(1.0 - (2.0 * inter + smooth) / (denom + smooth))


def cell_fraction(mask, grid_shape):
  """Average-pools mask: f32[B, X, Y, Z] to f32[B, x, y, z] (X = x * s)."""
  b = mask.shape[0]
  x, y, z = grid_shape
  sx, sy, sz = mask.shape[1] // x, mask.shape[2] // y, mask.shape[3] // z
  return mask.reshape(b, x, sx, y, sy, z, sz).mean(axis=(2, 4, 6))


def cell_masks(p, brain, grid_shape, cell_threshold, normal_in_brain):
  """(lesion, normal) bool[B, x, y, z] on the bottleneck grid."""
  frac = cell_fraction(p, grid_shape)
  lesion = frac >= cell_threshold
  normal = ~lesion
  if normal_in_brain:
    normal = normal & (cell_fraction(brain, grid_shape) >= 0.5)
  return lesion, normal


def masked_mean(feats, mask):
  """feats: f32[..., N, D], mask: bool[..., N] -> (mean f32[..., D], count f32[...]); 0 when
  empty."""
  m = mask.astype(feats.dtype)
  count = m.sum(-1)
  mean = jnp.einsum('...nd,...n->...d', feats, m) / jnp.maximum(count, 1.0)[..., None]
  return mean, count


def region_vectors(feats, lesion, normal):
  """Coarse granularity: per crop, mean F over lesion cells and over normal cells.

  feats f32[B, x, y, z, D]; lesion, normal bool[B, x, y, z] ->
  vecs f32[B, 2, D] (index 0 normal, 1 lesion), labels i32[B, 2], valid bool[B, 2].
  """
  b, d = feats.shape[0], feats.shape[-1]
  f = feats.reshape(b, -1, d)
  masks = jnp.stack([normal.reshape(b, -1), lesion.reshape(b, -1)], axis=1)  # [B, 2, N]
  vecs, count = masked_mean(f[:, None], masks)
  labels = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (b, 2))
  return vecs, labels, count > 0


def coarse_loss(class_logits, labels, valid):
  """Mean cross-entropy over valid region vectors. class_logits f32[..., 2]; 0 if none valid."""
  logp = jax.nn.log_softmax(class_logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  v = valid.astype(nll.dtype)
  return jnp.sum(nll * v) / jnp.maximum(v.sum(), 1.0)


def _blocks(a, patch):
  """Mini-patch view: a [B, X, Y, Z, ...] (X divisible by patch[0], ...) -> [B, M, K, ...],
  M = number of mini-patches per crop, K = px * py * pz cells per mini-patch (row-major)."""
  b, x, y, z = a.shape[:4]
  px, py, pz = patch
  gx, gy, gz = x // px, y // py, z // pz
  rest = a.shape[4:]
  a = a.reshape((b, gx, px, gy, py, gz, pz) + rest)
  a = a.transpose((0, 1, 3, 5, 2, 4, 6) + tuple(range(7, 7 + len(rest))))
  return a.reshape((b, gx * gy * gz, px * py * pz) + rest)


def _padded(feats, lesion, normal, patch):
  """Pads the grid so that `patch` divides it; padded cells belong to neither class."""
  pad = [(0, 0)] + [(0, (-n) % q) for n, q in zip(feats.shape[1:4], patch)]
  return jnp.pad(feats, pad + [(0, 0)]), jnp.pad(lesion, pad), jnp.pad(normal, pad)


def patch_vectors(feats, lesion, normal, patch):
  """Fine granularity: per mini-patch of `patch` cells, mean F over its lesion and its normal cells.

  A grid that `patch` does not divide is padded; padded cells belong to neither class.
  Returns vecs f32[B * M * 2, D], labels i32[B * M * 2] (0 normal, 1 lesion), valid bool[B * M * 2],
  M = number of mini-patches per crop.
  """
  d = feats.shape[-1]
  feats, lesion, normal = _padded(feats, lesion, normal, patch)
  f = _blocks(feats, patch)
  masks = jnp.stack([_blocks(normal, patch), _blocks(lesion, patch)], axis=2)  # [B, M, 2, K]
  vecs, count = masked_mean(f[:, :, None], masks)  # [B, M, 2, D]
  labels = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), count.shape)
  return vecs.reshape(-1, d), labels.reshape(-1), (count > 0).reshape(-1)


def patch_cells(feats, lesion, normal, patch):
  """Fine granularity, cell reading: every cell of every mini-patch, grouped by mini-patch.

  feats f32[B, x, y, z, D]; lesion, normal bool[B, x, y, z] -> cells f32[B * M, K, D],
  labels i32[B * M, K] (1 lesion, 0 normal), valid bool[B * M, K] (lesion or normal; padded cells
  and normal-excluded cells are not), K = cells per mini-patch.
  """
  d = feats.shape[-1]
  feats, lesion, normal = _padded(feats, lesion, normal, patch)
  cells = _blocks(feats, patch)
  k = cells.shape[2]
  les = _blocks(lesion, patch).reshape(-1, k)
  return (cells.reshape(-1, k, d), les.astype(jnp.int32),
          (les | _blocks(normal, patch).reshape(-1, k)))


def _pairs(labels, valid):
  """labels i32[G, K], valid bool[G, K] -> (pair, same) bool[G, K, K]: both valid and not the same
  vector; same class."""
  k = labels.shape[1]
  pair = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(k, dtype=bool)
  return pair, labels[:, :, None] == labels[:, None, :]


def _grouped_supcon(z, labels, valid, tau, need_negative):
  """SupCon within each group: z f32[G, K, d], labels i32[G, K], valid bool[G, K]. Anchors: valid,
  with a positive in their group (and a negative, when need_negative). Mean over anchors; 0 if
  none."""
  sim = jnp.einsum('gid,gjd->gij', z, z) / tau
  pair, same = _pairs(labels, valid)
  log_prob = sim - jax.nn.logsumexp(jnp.where(pair, sim, -1e9), axis=2, keepdims=True)
  pos = pair & same
  npos = pos.sum(2)
  mean_pos = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=2) / jnp.maximum(npos, 1)
  anchor = valid & (npos > 0)
  if need_negative:
    anchor = anchor & ((pair & ~same).sum(2) > 0)
  return -jnp.sum(jnp.where(anchor, mean_pos, 0.0)) / jnp.maximum(anchor.sum(), 1)


def supcon_loss(z, labels, valid, tau):
  """Supervised contrastive loss (Khosla et al. 2020, L_out) over all N vectors.

  z: f32[N, d] L2-normalised; labels: i32[N]; valid: bool[N]. For each valid anchor i with at least
  one positive: -mean_{p in P(i)} log(exp(z_i.z_p / tau) / sum_{a != i, valid} exp(z_i.z_a / tau)).
  Averaged over such anchors; 0 when there are none (no positive pairs in the batch).
  """
  return _grouped_supcon(z[None], labels[None], valid[None], tau, need_negative=False)


def local_supcon_loss(z, labels, valid, tau):
  """Supervised contrast of cells against the other cells of their own mini-patch only.

  z: f32[G, K, d] L2-normalised, G mini-patches of K cells; labels i32[G, K]; valid bool[G, K].
  Anchors are the valid cells whose mini-patch holds at least one valid cell of each class (the
  lesion border): for such an anchor i, -mean_{p in P(i)} log(exp(z_i.z_p / tau) /
  sum_{a != i valid, same mini-patch} exp(z_i.z_a / tau)); its negatives are the nearby cells of
  the other class, the hard ones. Averaged over anchors; 0 when there are none.
  """
  return _grouped_supcon(z, labels, valid, tau, need_negative=True)


def supcon_floor(labels, valid, tau):
  """The least value supcon_loss (labels, valid [N]) or local_supcon_loss ([G, K]) can take
  for these labels: mean over the same anchors of log(n_pos + n_neg * exp(-2 / tau)), reached when
  every positive coincides with its anchor and every negative is opposite. The loss minus this
  floor is how much of the term is still to learn: ~0 means it gives the encoder no gradient.
  """
  local = labels.ndim == 2
  if not local:
    labels, valid = labels[None], valid[None]
  pair, same = _pairs(labels, valid)
  npos = (pair & same).sum(2).astype(jnp.float32)
  nneg = (pair & ~same).sum(2).astype(jnp.float32)
  anchor = valid & (npos > 0) & ((nneg > 0) if local else True)
  per = jnp.log(jnp.maximum(npos, 1.0) + nneg * jnp.exp(-2.0 / tau))
  return jnp.sum(jnp.where(anchor, per, 0.0)) / jnp.maximum(anchor.sum(), 1)
