"""cgc_jax entry point: `python -m cgc_jax.main --config=configs/X.py --workdir=DIR [--mode=...]`, or
after `pip install .` the `cgc-jax` command, where `--config=demo` names a config shipped in the
package (a path works everywhere).

Modes: all (default: every stage whose output is missing or stale), verify, prepare, pseudo_labels,
train, evaluate, predict. Any config field can be overridden: `--config.train.steps=200`.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cgc_jax import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run folder: prepared data, labels, checkpoints, reports.')
flags.DEFINE_enum('mode', 'all', pipeline.MODES, 'Stage(s) to run.')
flags.DEFINE_bool('verbose', False, 'Show Python tracebacks for data and stage errors, and orbax INFO logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  pipeline.cli(lambda: pipeline.run(FLAGS.config, FLAGS.workdir, FLAGS.mode), FLAGS.verbose)


def run():
  """The `cgc-jax` console script."""
  app.run(main, argv=pipeline.resolve_config(sys.argv))


if __name__ == '__main__':
  run()
