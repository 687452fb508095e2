"""A run's networks: one, or several whose mean segments a case.

Cross-fitting (train.folds = n >= 2): n networks, each trained on every case but one fold's; a case
is segmented by the mean of all of them, or (eval.fold_networks='unseen') of those that never saw
its pseudo-labels. A network trained on all cases fits each case's own P, errors included; a case's
out-of-fold network can only carry over what the other cases' P agree on. Case i of the sorted case
ids is in fold i mod n (balanced, and fixed by the ids alone). Fold f's run lives in
WORKDIR/folds/<f>/ (checkpoints/, train/), with the same layout as WORKDIR/ has for one network.

An ensemble (train.ensemble = k >= 2): k networks, each trained on every case, network m with the
seed train.seed + SEED_STRIDE * m (its own initial weights, crops and batch order), segmenting as
their mean. Network 0 is the one-network run itself, in WORKDIR/ (so an existing run grows into
an ensemble by training only the others); network m >= 1 lives in WORKDIR/ensemble/<m>/.
"""
import os

FOLDS = 'folds'
ENSEMBLE = 'ensemble'
SEED_STRIDE = 1000  # ensemble network m trains with seed train.seed + SEED_STRIDE * m


def assign(cases, n: int) -> dict:
  """{case: fold in [0, n)}: case i of sorted(cases) is in fold i mod n."""
  return {c: i % n for i, c in enumerate(sorted(cases))}


def training_cases(cases, fold: int, n: int) -> list:
  """The cases network `fold` trains on (sorted): every case not in that fold; all when n == 1."""
  if n <= 1:
    return sorted(cases)
  return [c for c, f in assign(cases, n).items() if f != fold]


def run_dirs(workdir: str, n: int, ensemble: int = 1) -> list:
  """The folder holding each network's checkpoints/ and train/: [WORKDIR] for one network;
  [WORKDIR/folds/0, ..., WORKDIR/folds/n-1] when n >= 2 (cross-fitting); [WORKDIR,
  WORKDIR/ensemble/1, ..., WORKDIR/ensemble/k-1] for an ensemble of k >= 2."""
  if n > 1:
    return [os.path.join(workdir, FOLDS, str(f)) for f in range(n)]
  return [workdir] + [os.path.join(workdir, ENSEMBLE, str(m)) for m in range(1, ensemble)]


def network_dirs(config, workdir: str) -> list:
  """run_dirs for `config`'s train.folds and train.ensemble."""
  return run_dirs(workdir, int(config.train.get('folds', 1)),
                  int(config.train.get('ensemble', 1)))


def num_networks(config) -> int:
  """How many networks `config` trains: train.folds or train.ensemble (1 when neither is > 1)."""
  return len(network_dirs(config, ''))


def network_config(config, index: int):
  """The config network `index` trains with: `config` itself, except for an ensemble (train.ensemble
  >= 2), whose network m is the one-network run of seed train.seed + SEED_STRIDE * m (train.ensemble
  set to 1, so network 0's checkpoints are exactly the one-network run's; train.ensemble_guide
  applies to networks m >= 1 only)."""
  if int(config.train.get('ensemble', 1)) <= 1:
    return config
  c = config.copy_and_resolve_references()
  c.train.seed = int(config.train.seed) + SEED_STRIDE * index
  c.train.ensemble = 1
  if index == 0 and 'ensemble_guide' in c.train:  # network 0 is the unguided one-network run
    c.train.ensemble_guide = 'none'
  return c


def members_for(case: str, seen: list) -> list:
  """Indices of the networks that segment `case`: those whose training cases (`seen`, one
  collection per network) leave it out; all of them when every network saw it (one network, an
  ensemble) or none did (a new scan)."""
  unseen = [i for i, s in enumerate(seen) if case not in s]
  return unseen or list(range(len(seen)))
