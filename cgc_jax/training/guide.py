"""What an ensemble's first network tells the others (train.ensemble_guide), label-free.

A network trained on every case's P reproduces P where P is consistent with the other cases and
departs from it where it is not: on the 20 development cases the rank correlation of its agreement
with P (Dice of its mask with P) with P's real Dice is +0.9. Networks m >= 1 of an ensemble
(train.ensemble >= 2) can use that at the cost of one sliding-window pass of network 0 over the
training cases:

  'cases'   each case's segmentation loss weighs the rank, among the training cases (0 = lowest,
            1 = highest), of network 0's agreement with its P: the cases whose P network 0 could
            least reproduce teach the others least and are segmented from what the rest taught;
  'voxels'  the voxels where network 0's mask and P disagree weigh 0 in the loss: what the others
            learn is only where P and a network that saw every case agree.

Network 0 itself trains as the one-network run (folds.network_config). Its masks are cached in
WORKDIR/ensemble/guide/ (one shard per case: mask u8[X', Y', Z'] on the prepared grid, meta
`agreement`), keyed by network 0's train fingerprint and step and each case's P identity.
"""
import hashlib
import os
import time

from absl import logging
import numpy as np

from cgc_jax.core import fingerprints
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import metrics
from cgc_jax.runtime import distributed

GUIDE_DIR = 'guide'


def identity(net0_config, step: int) -> str:
  """The guide's identity: network 0's train fingerprint and the step its params are from."""
  return hashlib.sha256(f'{fingerprints.of(net0_config, "train")}:{int(step)}'.encode()
                        ).hexdigest()[:16]


def first_network_masks(net0_config, guide_root: str, step: int, make_predict, cases: list,
                        prep, labels) -> dict:
  """{case: (mask u8[X', Y', Z'] of network 0 on the prepared grid, memory-mapped from the cache
  (1 where its probability > 0.5 inside the brain, before any mask rule), agreement: Dice of that
  mask with the case's P)}, from the cache in guide_root where current, else predicted and cached.
  make_predict() -> predict(image f32[X', Y', Z', C]) -> lesion probability f32[X', Y', Z'] of
  network 0 at `step` (the train stage passes a sliding window; called only when a case needs
  predicting). Every process predicts (the sliding window is collective); process 0 writes, and
  every process reads the cache back (the workdir is shared, as for checkpoints)."""
  verify = net0_config.data.verify_checksums
  store = store_lib.Store(guide_root, identity(net0_config, step))
  agreement, todo = {}, []
  for c in cases:
    if store.is_complete(c, {'p': labels.identity(c)}):
      agreement[c] = float(store.meta(c)['agreement'])
    else:
      todo.append(c)
  predict = make_predict() if todo else None
  t0 = time.time()
  for i, c in enumerate(todo):
    image = np.asarray(prep.read(c, 'image', verify), np.float32)
    brain = np.asarray(prep.read(c, 'brain', verify)) > 0
    p = np.asarray(labels.read(c, 'p', verify)) > 0
    mask = (predict(image) > 0.5) & brain
    a = float(metrics.dice(mask, p & brain))
    if distributed.is_main():
      store.write(c, {'mask': mask.astype(np.uint8)},
                  {'agreement': a, 'inputs': {'p': labels.identity(c)}})
    agreement[c] = a
    el = time.time() - t0
    logging.info('guide: network 0 on %d/%d training cases (%.2f case/s, ETA %.0fs) %s: '
                 'agreement with P %.3f', i + 1, len(todo), (i + 1) / el,
                 (len(todo) - i - 1) * el / (i + 1), c, a)
  if todo:
    distributed.sync('guide-written', '', net0_config.dist.barrier_timeout_s)
  return {c: (store.read(c, 'mask', verify), agreement[c]) for c in cases}


def case_weights(agreements: dict) -> dict:
  """'cases': {case: rank of its agreement among the cases, in [0, 1]} (quality.ranks: ties share
  the mean rank, a single case weighs 0.5)."""
  from cgc_jax.labels import quality  # pylint: disable=g-import-not-at-top
  cases = sorted(agreements)
  r = quality.ranks([agreements[c] for c in cases])
  return {c: float(v) for c, v in zip(cases, r)}


def voxel_weight(mask, p) -> np.ndarray:
  """'voxels': f32[X', Y', Z'], 1 where network 0's mask and P (both on the prepared grid) agree, 0
  where they disagree."""
  return (np.asarray(mask, bool) == (np.asarray(p) > 0)).astype(np.float32)


def guide_root(workdir: str) -> str:
  """Where the ensemble's guide shards live: WORKDIR/ensemble/guide."""
  from cgc_jax.core import folds as folds_lib  # pylint: disable=g-import-not-at-top
  return os.path.join(workdir, folds_lib.ENSEMBLE, GUIDE_DIR)
