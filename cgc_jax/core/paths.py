"""The workdir's layout: every folder name a stage reads or writes, and the stores of its shards.

    WORKDIR/prepared/        prepare: one shard per case (image, brain)
    WORKDIR/references/      prepare, evaluate: each labelled case's ground truth (scoring only)
    WORKDIR/pseudo_labels/   pseudo_labels: P per case, reports/, nifti/ (P on the original grid)
    WORKDIR/checkpoints/     train: orbax checkpoints
    WORKDIR/train/           train: metrics.jsonl, track.jsonl, tensorboard/, curves.png
    WORKDIR/folds/<f>/       train.folds >= 2: network f's checkpoints/ and train/ (folds.py)
    WORKDIR/ensemble/<m>/    train.ensemble >= 2: network m's (m >= 1; network 0 is WORKDIR's own)
    WORKDIR/ensemble/guide/  train.ensemble_guide: network 0's masks on the training cases
    WORKDIR/eval/            evaluate: predictions/, cases.csv, summary.{json,md}, pictures/
    WORKDIR/predict/         predict: prepared/ (new scans), masks/ (unless eval.output_dir)
    WORKDIR/config.json, log.txt, .lock
"""
import os

from cgc_jax.core import fingerprints
from cgc_jax.core import store as store_lib

PREPARED = 'prepared'
PSEUDO_LABELS = 'pseudo_labels'
REFERENCES = 'references'
CHECKPOINTS = 'checkpoints'
TRAIN = 'train'
EVAL = 'eval'
PREDICT = 'predict'


def cache_dir() -> str:
  """Where built artefacts shared by every run of this user live (oneDNN's build, the phantoms):
  $CGC_JAX_CACHE, default ~/.cache/cgc_jax."""
  return os.environ.get('CGC_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                         'cgc_jax')


def prepared_store(config, workdir: str) -> store_lib.Store:
  return store_lib.Store(os.path.join(workdir, PREPARED), fingerprints.of(config, 'prepare'))


def reference_store(config, workdir: str) -> store_lib.Store:
  """Ground truth on the prepared grids (stages/references.py): never read by training."""
  return store_lib.Store(os.path.join(workdir, REFERENCES), fingerprints.of(config, 'prepare'))


def pl_store(config, workdir: str) -> store_lib.Store:
  return store_lib.Store(os.path.join(workdir, PSEUDO_LABELS),
                         fingerprints.of(config, 'pseudo_labels'))


def predict_store(config, workdir: str) -> store_lib.Store:
  """New scans prepared for --mode=predict (apart from the training data)."""
  return store_lib.Store(os.path.join(workdir, PREDICT, PREPARED),
                         fingerprints.of(config, 'prepare'))


def metrics_file(workdir: str) -> str:
  """The train stage's per-step losses (one JSON row a logged step)."""
  return os.path.join(workdir, TRAIN, 'metrics.jsonl')


def track_file(workdir: str) -> str:
  """Label-free signals (and analysis Dice) along training, one JSON row per tracked step."""
  return os.path.join(workdir, TRAIN, 'track.jsonl')


def checkpoints(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS)


def predict_output(config, workdir: str) -> str:
  """Where --mode=predict writes masks: eval.output_dir, else WORKDIR/predict/masks."""
  return config.eval.get('output_dir', '') or os.path.join(workdir, PREDICT, 'masks')
