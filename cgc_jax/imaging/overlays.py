"""Overlay pictures (matplotlib, Agg): per case the axial slice of largest lesion area with ground
truth, P and prediction contours (the paper's Fig. 2), and one per-case Dice figure."""
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

_COLOURS = {'ground truth': 'lime', 'P': 'yellow', 'network': 'red'}


def case_figure(image, masks: dict, title: str, path: str):
  """image f32[X, Y, Z] (RAS); masks name -> bool[X, Y, Z]; slice = largest first-mask area."""
  ref = next((m for m in masks.values() if m is not None and m.any()), None)
  z = int(np.argmax(ref.sum((0, 1)))) if ref is not None else image.shape[2] // 2
  fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
  ax.imshow(np.rot90(image[:, :, z]), cmap='gray')
  for name, m in masks.items():
    if m is not None and m[:, :, z].any():
      ax.contour(np.rot90(m[:, :, z].astype(float)), levels=[0.5], colors=_COLOURS.get(name, 'c'),
                 linewidths=1.2)
  handles = [plt.Line2D([], [], color=_COLOURS.get(n, 'c'), label=n) for n in masks]
  ax.legend(handles=handles, loc='lower right', fontsize=7)
  ax.set_title(title, fontsize=8)
  ax.axis('off')
  tmp = path[:-4] + '.tmp.png'
  fig.savefig(tmp, bbox_inches='tight')
  plt.close(fig)
  os.replace(tmp, path)


def write_all(out_dir, prep, refs, cases, probs, p_masks, per_case, p_name, n_name):
  d = os.path.join(out_dir, 'pictures')
  os.makedirs(d, exist_ok=True)
  rows = {r['case']: r for r in per_case}
  for c in cases:
    image = np.asarray(prep.read(c, 'image')[..., 0], np.float32)
    gt = np.asarray(refs.read(c, 'label')) > 0 if refs.is_complete(c) else None
    r = rows.get(c, {})
    title = (f'{c}  Dice P {r.get("p_dice", float("nan")):.3f}  '
             f'net {r.get("net_dice", float("nan")):.3f}')
    case_figure(image, {'ground truth': gt, 'P': p_masks.get(c), 'network': probs[c] > 0.5}, title,
                os.path.join(d, f'{c}.png'))
  if per_case:
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(per_case)), 3.5), dpi=100)
    x = np.arange(len(per_case))
    ax.bar(x - 0.2, [r.get('p_dice', np.nan) for r in per_case], 0.4, label=p_name)
    ax.bar(x + 0.2, [r['net_dice'] for r in per_case], 0.4, label=n_name)
    ax.set_xticks(x, [r['case'] for r in per_case], rotation=60, fontsize=6)
    ax.set_ylabel('Dice')
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(d, 'dice.png'))
    plt.close(fig)


def write_predictions(out_dir, prep, cases, probs):
  """Predict mode: out_dir/pictures/<case>.png, the first channel with the network's contour on the
  slice of largest predicted area (no ground truth, no P). probs: case -> f32[X, Y, Z] prepared
  grid."""
  d = os.path.join(out_dir, 'pictures')
  os.makedirs(d, exist_ok=True)
  for c in cases:
    image = np.asarray(prep.read(c, 'image')[..., 0], np.float32)
    mask = probs[c] > 0.5
    case_figure(image, {'network': mask}, f'{c}  {int(mask.sum())} lesion voxels (prepared grid)',
                os.path.join(d, f'{c}.png'))
