"""Every error type cgc_jax raises on purpose, importable without JAX (offline-stage workers,
`main`).

The command line turns every error in `USER_ERRORS` into one paragraph on stderr and exit code 2;
the modules that raise them keep their old names as aliases (`readers.DataError` is
`errors.DataError`).
"""


class DistributedError(Exception):
  """Multi-process start-up or a barrier failed (missing processes, wrong device count, a peer's
  stage failed)."""


class IncompatibleCheckpointError(Exception):
  """The workdir's checkpoints were made with a different config."""


class GMMError(Exception):
  """The mixture could not be fitted; the message names the case."""


class CaseFailure(Exception):
  """A case failed in a worker; `expected` marks known bad-input errors (no traceback needed)."""

  def __init__(self, case_id: str, message: str, tb: str = '', expected: bool = False):
    super().__init__(f'{case_id}: {message}')
    self.case_id, self.message, self.tb, self.expected = case_id, message, tb, expected


class WorkdirError(Exception):
  """The workdir cannot be used (read-only, full, locked by another run)."""


class StageError(Exception):
  """A stage could not finish; the message lists every failed case and why. `done`: the cases that
  did complete (kept on disk)."""

  def __init__(self, message: str, done=()):
    super().__init__(message)
    self.done = list(done)


class ConfigError(Exception):
  """A config field holds a value it cannot take; the message names each field and what it
  accepts."""


class DataError(Exception):
  """Bad input data; the message lists every problem with its file."""


class CorruptShardError(Exception):
  """A shard's array does not match its recorded checksum or shape."""


class Preempted(Exception):
  """SIGTERM arrived: the state was saved at the current step."""


class NonFiniteError(Exception):
  """A loss became NaN/Inf; the last good checkpoint is kept."""


# What the command line reports as a user error (one paragraph, exit 2; traceback with --verbose).
USER_ERRORS = (ConfigError, DataError, StageError, CaseFailure, WorkdirError, CorruptShardError,
               IncompatibleCheckpointError, DistributedError)
