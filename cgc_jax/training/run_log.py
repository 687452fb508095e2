"""What a training run leaves to look at: WORKDIR/train/metrics.jsonl, TensorBoard event files in
WORKDIR/train/tensorboard/ (every loss component, learning rate, gradient norm, and the tracked
label-free signals under `track/`), and WORKDIR/train/curves.png.

    tensorboard --logdir=WORKDIR/train/tensorboard

Event files are written with tensorboardX (no TensorFlow). A resumed run drops the rows and events
past the step it resumed from, so the curves show each step once.
"""
import json
import os

from absl import logging

from cgc_jax.core import paths


class RunLog:
  """Process 0's training log. `write(step, values)` after a logged step, `track(step, means)`
  after a tracking pass, `close()` at the end (also draws curves.png)."""

  def __init__(self, workdir: str, start: int):
    self.dir = os.path.join(workdir, paths.TRAIN)
    os.makedirs(self.dir, exist_ok=True)
    self.path = os.path.join(self.dir, 'metrics.jsonl')
    if os.path.exists(self.path):  # rows past `start` will be redone
      with open(self.path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= start]
      with open(self.path, 'w') as f:
        f.writelines(rows)
    self._jsonl = open(self.path, 'a')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(self.dir, 'tensorboard'), purge_step=start + 1,
                             flush_secs=30)

  def write(self, step: int, values: dict):
    self._jsonl.write(json.dumps(dict(step=step, **values)) + '\n')
    self._jsonl.flush()
    for k, v in values.items():
      if k != 'time':
        self._tb.add_scalar(f'train/{k}', v, step)

  def track(self, step: int, means: dict):
    for k, v in (means or {}).items():
      self._tb.add_scalar(f'track/{k}', v, step)
    self._tb.flush()

  def close(self):
    self._jsonl.close()
    self._tb.close()
    try:
      draw_curves(self.path, os.path.join(self.dir, 'track.jsonl'),
                  os.path.join(self.dir, 'curves.png'))
    except Exception as e:  # pylint: disable=broad-except  (a picture never fails a run)
      logging.warning('train: no curves.png (%s: %s)', type(e).__name__, e)


def draw_curves(metrics_path: str, track_path: str, out_path: str):
  """curves.png: the loss components against steps and, when tracked, the label-free signals."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
  track = ([json.loads(line) for line in open(track_path) if line.strip()]
           if os.path.exists(track_path) else [])
  if not rows:
    return
  fig, axes = plt.subplots(1, 2 if track else 1, figsize=(11 if track else 6, 4), squeeze=False)
  for k in ('loss', 'seg', 'dice', 'coarse', 'fine'):
    if k in rows[0]:
      axes[0, 0].plot([r['step'] for r in rows], [r[k] for r in rows], label=k)
  axes[0, 0].set_xlabel('step')
  axes[0, 0].set_yscale('log')
  axes[0, 0].legend()
  axes[0, 0].set_title('training losses')
  for k in ('flip_agreement', 'p_agreement', 'confident_ce', 'dice'):
    pts = [(r['step'], r[k]) for r in track if k in r]
    if pts:
      axes[0, 1].plot(*zip(*pts), marker='o',
                      label=k + (' (ground truth, analysis only)' if k == 'dice' else ''))
  if track:
    axes[0, 1].set_xlabel('step')
    axes[0, 1].legend(fontsize=8)
    axes[0, 1].set_title('tracked signals')
  fig.tight_layout()
  tmp = out_path + '.tmp.png'
  fig.savefig(tmp, dpi=80)
  plt.close(fig)
  os.replace(tmp, out_path)
