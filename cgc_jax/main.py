"""cgc_jax entry point: `python -m cgc_jax.main --config=configs/X.py --workdir=DIR [--mode=...]`,
or after `pip install .` the `cgc-jax` command, where `--config=demo` names a config shipped in the
package (a path works everywhere).

Modes: all (default: every stage whose output is missing or stale), verify, prepare, pseudo_labels,
train, evaluate, predict, export. Any config field can be overridden: `--config.train.steps=200`.

Predict needs only a trained workdir (its config.json is restored when --config is not given), or a
model package made by export:
    cgc-jax --mode=predict --workdir=W --input=scan_dir_or_file --output=masks/ [--probabilities]
    cgc-jax --mode=export --workdir=W --output=model.zip
    cgc-jax --mode=predict --model=model.zip --workdir=scratch --input=... --output=masks/
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
flags.DEFINE_bool('verbose', False,
                  'Show Python tracebacks for data and stage errors, and orbax INFO logs.')
flags.DEFINE_string(
    'input', None, 'Predict: new scans (a NIfTI file, a case folder, a folder of cases '
    'or an nnU-Net imagesTs folder); sets eval.input_root.')
flags.DEFINE_string('output', None, 'Predict: folder for the masks; sets eval.output_dir. '
                    'Export: the model package file (.zip).')
flags.DEFINE_enum('output_format', None, ['nifti', 'dicom_seg'], 'Predict: dicom_seg also '
                  'writes <case>.dcm, a DICOM-SEG, for cases read from DICOM series; sets '
                  'eval.output_format.')
flags.DEFINE_string('model', None, 'Predict: a model package (.zip, from --mode=export) to '
                    'predict with instead of the workdir\'s checkpoints; its config is used.')
flags.DEFINE_bool('probabilities', False, 'Predict: also write <case>_prob.nii.gz (lesion '
                  'probability); sets eval.save_probabilities.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None and FLAGS.mode not in ('predict', 'export'):
    raise app.UsageError('--config is required (only --mode=predict and --mode=export restore it '
                         'from the workdir)')
  if FLAGS.model and FLAGS.mode != 'predict':
    raise app.UsageError('--model is for --mode=predict')

  def job():
    if FLAGS.model:
      config = pipeline.package_config(FLAGS.model)
    else:
      config = FLAGS.config or pipeline.workdir_config(FLAGS.workdir)
    if FLAGS.mode == 'export':
      return pipeline.export_model(config, FLAGS.workdir, FLAGS.output)
    if FLAGS.output_format:
      config = config.copy_and_resolve_references()
      config.eval.output_format = FLAGS.output_format
    if FLAGS.input or FLAGS.output or FLAGS.probabilities:
      config = pipeline.with_predict_paths(config, FLAGS.input, FLAGS.output, FLAGS.probabilities)
    return pipeline.run(config, FLAGS.workdir, FLAGS.mode)

  pipeline.cli(job, FLAGS.verbose)


def run():
  """The `cgc-jax` console script."""
  app.run(main, argv=pipeline.resolve_config(sys.argv))


if __name__ == '__main__':
  run()
