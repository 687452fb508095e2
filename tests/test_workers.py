from cgc_jax.imaging import readers
from cgc_jax.runtime import workers


def square_or_fail(x):
  if x == 3:
    raise ZeroDivisionError('boom in worker')
  if x == 4:
    raise readers.DataError('case 4: bad file')
  return x * x


def test_results_in_order_and_errors_name_case_with_worker_traceback():
  jobs = [(f'c{i}', (i,)) for i in range(6)]
  for n in (1, 2):
    out = workers.map_cases(square_or_fail, jobs, n, 'test',
                            expected_types=(readers.DataError,))
    assert list(out) == [f'c{i}' for i in range(6)]
    assert [out[f'c{i}'] for i in (0, 1, 2, 5)] == [0, 1, 4, 25]
    bad = out['c3']
    assert isinstance(bad, workers.CaseFailure) and bad.case_id == 'c3' and not bad.expected
    assert 'ZeroDivisionError: boom in worker' in bad.message
    assert 'square_or_fail' in bad.tb and 'raise ZeroDivisionError' in bad.tb  # worker's own frames
    assert out['c4'].expected and 'bad file' in out['c4'].message
