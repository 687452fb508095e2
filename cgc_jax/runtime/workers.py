"""A worker pool over cases for the offline stages, with a progress line (rate, ETA).

Errors come back with the case id and the worker's own traceback, never a bare "worker died".
Results are returned in input order, so outputs do not depend on the number of workers.
"""
import concurrent.futures as cf
import multiprocessing as mp
import time
import traceback

from absl import logging

from cgc_jax import errors


CaseFailure = errors.CaseFailure  # defined in errors.py (every user-facing error in one place)


def _call(fn, case_id, args, expected_types):
  try:
    return ('ok', fn(*args))
  except expected_types as e:
    return ('expected', str(e))
  except BaseException as e:  # pylint: disable=broad-except
    return ('error', f'{type(e).__name__}: {e}', traceback.format_exc())


class Progress:
  """Logs `desc: done/total (rate/s, ETA)` at most every `every_s` seconds."""

  def __init__(self, desc: str, total: int, every_s: float = 5.0, unit: str = 'case'):
    self.desc, self.total, self.every_s, self.unit = desc, total, every_s, unit
    self.t0 = time.time()
    self.last = 0.0
    self.done = 0

  def update(self, n: int = 1, extra: str = ''):
    self.done += n
    now = time.time()
    if now - self.last >= self.every_s or self.done >= self.total:
      self.last = now
      el = now - self.t0
      rate = self.done / el if el > 0 else 0.0
      eta = (self.total - self.done) / rate if rate > 0 else float('nan')
      logging.info('%s: %d/%d %ss (%.2f %s/s, %.1fs elapsed, ETA %.1fs)%s', self.desc, self.done,
                   self.total, self.unit, rate, self.unit, el, eta, f' {extra}' if extra else '')


def map_cases(fn, jobs: list, num_workers: int, desc: str, expected_types=()):
  """Runs fn(*args) for each (case_id, args) in `jobs`. Returns {case_id: result or CaseFailure}.

  Failures are collected, not raised, so one bad case never discards the good ones.
  """
  results = {}
  progress = Progress(desc, len(jobs))
  if not jobs:
    return results
  if num_workers <= 1 or len(jobs) == 1:
    for case_id, args in jobs:
      results[case_id] = _wrap(case_id, _call(fn, case_id, args, expected_types))
      progress.update()
    return results
  # spawn, not fork: the parent may already hold JAX's threads.
  with cf.ProcessPoolExecutor(max_workers=min(num_workers, len(jobs)),
                              mp_context=mp.get_context('spawn')) as ex:
    futures = {ex.submit(_call, fn, cid, args, expected_types): cid for cid, args in jobs}
    for fut in cf.as_completed(futures):
      cid = futures[fut]
      try:
        results[cid] = _wrap(cid, fut.result())
      except BaseException as e:  # pylint: disable=broad-except
        results[cid] = CaseFailure(cid, f'worker process died ({type(e).__name__}: {e})',
                                   traceback.format_exc())
      progress.update()
  return {cid: results[cid] for cid, _ in jobs}


def _wrap(case_id, r):
  if r[0] == 'ok':
    return r[1]
  if r[0] == 'expected':
    return CaseFailure(case_id, r[1], expected=True)
  return CaseFailure(case_id, r[1], r[2])
