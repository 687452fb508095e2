"""Per-case bookkeeping shared by the offline stages: which cases are still to do (their shards
missing, stale, or made from other inputs), each process's share of them, and, once every process
has finished, the manifest and one error listing every failed case (good cases are kept).
"""
from absl import logging

from cgc_jax import errors
from cgc_jax.core import store as store_lib
from cgc_jax.runtime import workers


def report_failures(results: dict, what: str):
  failures = [r for r in results.values() if isinstance(r, workers.CaseFailure)]
  for cid, r in results.items():
    if not isinstance(r, workers.CaseFailure):
      for w in r.get('warnings', []):
        logging.warning('%s: %s', cid, w)
      if r.get('approximate_brain'):
        logging.warning('%s: brain mask is APPROXIMATE (HU window, largest component): the CT was '
                        'not brain-extracted', cid)
  if failures:
    lines = []
    for f in failures:
      lines.append(f.message if f.expected else f'{f.case_id}: {f.message}\n{f.tb}')
    raise errors.StageError(f'{what}: {len(failures)} of {len(results)} cases failed:\n' +
                            '\n'.join(lines))


def start_cases(config, store: store_lib.Store, cases: list, what: str, inputs=None) -> list:
  """Clears writes left by killed runs and returns THIS process's share of the cases still to do.

  A case is done when its shard is complete for this fingerprint and, with `inputs` ({case: input
  identity}), was made from those same inputs. Cases are split round robin across JAX processes;
  process 0 cleans, the others wait for it.
  """
  inputs = inputs or {}
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top  (workers skip JAX)
  # every process lists the work BEFORE the barrier, i.e. before anyone writes: the same list
  # everywhere, so the round-robin shares cover each case exactly once
  todo = [c for c in cases if not store.is_complete(c, inputs.get(c))]
  if distributed.is_main():
    store.clean_partial()
  distributed.sync(f'{what}-start', '', config.dist.barrier_timeout_s)
  mine = distributed.share(todo)
  logging.info('%s: %d cases, %d already done, %d to do (%d in this process)', what, len(cases),
               len(cases) - len(todo), len(todo), len(mine))
  return mine


def finish_cases(config, store: store_lib.Store, cases: list, results: dict, what: str,
                 inputs=None) -> list:
  """Waits for every process's share, writes the manifest (process 0), raises on any failure.

  Good cases are kept whatever failed; every process raises the same error listing all failures.
  """
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  err = ''
  try:
    report_failures(results, what)
  except errors.StageError as e:
    err = str(e)
  try:
    distributed.sync(what, err, config.dist.barrier_timeout_s)
  finally:
    done = [c for c in cases if store.is_complete(c, (inputs or {}).get(c))]
    if distributed.is_main():
      store.write_manifest(done)
  if err:
    raise errors.StageError(err, done)
  return done
