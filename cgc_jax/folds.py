"""Cross-fitting (train.folds = n >= 2): n networks, each trained on every case but one fold's;
a case is segmented by the mean of all of them, or (eval.fold_networks='unseen') of those that
never saw its pseudo-labels.

A network trained on all cases fits each case's own P, errors included; a case's out-of-fold
network can only carry over what the other cases' P agree on. Case i of the sorted case ids is in
fold i mod n (balanced, and fixed by the ids alone). Fold f's run lives in WORKDIR/folds/<f>/
(checkpoints/, train/), with the same layout as WORKDIR/ has for one network.
"""
import os

FOLDS = 'folds'


def assign(cases, n: int) -> dict:
  """{case: fold in [0, n)}: case i of sorted(cases) is in fold i mod n."""
  return {c: i % n for i, c in enumerate(sorted(cases))}


def training_cases(cases, fold: int, n: int) -> list:
  """The cases network `fold` trains on (sorted): every case not in that fold; all when n == 1."""
  if n <= 1:
    return sorted(cases)
  return [c for c, f in assign(cases, n).items() if f != fold]


def run_dirs(workdir: str, n: int) -> list:
  """The folder holding each network's checkpoints/ and train/: [WORKDIR] when n == 1, else
  [WORKDIR/folds/0, ..., WORKDIR/folds/n-1]."""
  if n <= 1:
    return [workdir]
  return [os.path.join(workdir, FOLDS, str(f)) for f in range(n)]


def members_for(case: str, seen: list) -> list:
  """Indices of the networks that segment `case`: those whose training cases (`seen`, one
  collection per network) leave it out; all of them when every network saw it (one network) or
  none did (a new scan)."""
  unseen = [i for i, s in enumerate(seen) if case not in s]
  return unseen or list(range(len(seen)))
