"""User-facing error types that must be importable without JAX (offline-stage workers, `main`).

`main` turns every error in `pipeline.USER_ERRORS` into one paragraph on stderr and exit code 2.
"""


class DistributedError(Exception):
  """Multi-process start-up or a barrier failed (missing processes, wrong device count, a peer's
  stage failed)."""


class IncompatibleCheckpointError(Exception):
  """The workdir's checkpoints were made with a different config."""
