"""The experiment tables as markdown: the table of each row's figures, P's table with Dice per case,
the length table's signals along training, and the selection protocol's paired comparison."""
import math

import numpy as np

from cgc_jax.studies import protocol


def paired_markdown(results: dict) -> str:
  """The selection protocol's table (studies.protocol): each row against the first row of its
  kind (trained rows against the first trained row, P rows against the first P row), case by case
  on the two fixed halves and all cases with a bootstrap interval; '' when no row has a partner."""
  out = []
  for trained in (False, True):
    rows = {n: s['per_case_seeds'] for n, s in results.items()
            if s.get('per_case_seeds') and (s['seeds'] != ['-']) == trained}
    if len(rows) > 1:
      first = next(iter(rows))
      out.append(protocol.markdown({n: protocol.compare(rows[first], r) for n, r in rows.items()
                                    if n != first}, first))
  return '\n'.join(out)


def _fmt(v) -> str:
  return '-' if v is None else f'{v:.4f}'


def markdown(table: str, results: dict, config) -> str:
  if table == 'length':
    return length_markdown(results, config)
  seeds = max((len(s['seeds']) for s in results.values() if s['seeds'] != ['-']), default=0)
  if table == 'pseudo_labels':
    return p_markdown(results, config)
  lines = [f'Table `{table}` ({config.data.layout}, {seeds} seed(s) per trained row; mean +- std '
           'over cases pooled over seeds; P rows: the pseudo-labels themselves)', '',
           '| row | Dice | std of seed means | Sensitivity | ASSD [mm] | time [s] | '
           'fine loss above its floor, coarse loss (last quarter of training) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for name, s in results.items():
    sd = s['dice_std_across_seeds']
    if s.get('round_p_dice'):  # self-training: how good the last round's labels were
      name += ' (its P: {:.4f})'.format(np.mean([r[-1] for r in s['round_p_dice'].values()]))
    lines.append(f'| {name} | {s["dice"]["mean"]:.4f} +- {s["dice"]["std"]:.4f} | '
                 f'{"-" if math.isnan(sd) else f"{sd:.4f}"} | {s["sensitivity"]["mean"]:.4f} +- '
                 f'{s["sensitivity"]["std"]:.4f} | {s["assd"]["mean"]:.2f} +- '
                 f'{s["assd"]["std"]:.2f} | {s["seconds"]:.0f} | '
                 f'{_fmt(s.get("fine_above_floor"))}, {_fmt(s.get("coarse"))} |')
  paired = paired_markdown(results)
  return '\n'.join(lines) + '\n' + ('\n' + paired if paired else '')


def p_markdown(results: dict, config) -> str:
  """The pseudo-label table: per row mean +- std, empty masks, seconds per case, then Dice per
  case."""
  lines = [f'Table `pseudo_labels` ({config.data.layout}; P alone against the ground truth on each '
           'scan\'s original grid; deterministic, so no seeds)', '',
           '| row | Dice | Sensitivity | ASSD [mm] | empty P | s/case |', '| --- ' * 6 + '|']
  for name, s in results.items():
    lines.append(f'| {name} | {s["dice"]["mean"]:.4f} +- {s["dice"]["std"]:.4f} | '
                 f'{s["sensitivity"]["mean"]:.4f} | {s["assd"]["mean"]:.2f} | '
                 f'{s["empty_pred_cases"]}/{s["cases"]} | '
                 f'{s.get("seconds_per_case", float("nan")):.2f} |')
  cases = sorted({c for s in results.values() for c in s.get('per_case', {})})
  if cases:
    names = list(results)
    lines += ['', 'Dice per case (rows in the order above):', '',
              '| case | ' + ' | '.join(str(i + 1) for i in range(len(names))) + ' |',
              '| --- ' * (len(names) + 1) + '|']
    for c in cases:
      lines.append(f'| {c} | ' + ' | '.join(
          f'{results[n]["per_case"].get(c, float("nan")):.3f}' for n in names) + ' |')
  paired = paired_markdown(results)
  return '\n'.join(lines) + '\n' + ('\n' + paired if paired else '')


_SIGNALS = {'dice': 'Dice vs ground truth (analysis only)', 'flip_agreement': 'flip agreement',
            'p_agreement': 'agreement with P', 'confident_ce': 'CE on confident P voxels'}


def length_markdown(results: dict, config) -> str:
  rules = results.get('stopping rules (every tracked run)', {})
  rows = {k: v for k, v in results.items() if 'along_training' in v}
  lines = [f'Table `length` ({config.data.layout}, {config.train.steps} steps): mean over cases '
           '(prepared grid, no TTA) and seeds along training; final-step Dice with the evaluate '
           'stage\'s settings in the last column.', '']
  for name, s in rows.items():
    at = s['along_training']
    steps = sorted(next(iter(at.values())), key=int) if at else []
    lines += [f'**{name}** ({len(s["seeds"])} seed(s))', '',
              '| signal | ' + ' | '.join(f'step {k}' for k in steps) + ' | final (evaluate) |',
              '| --- ' * (len(steps) + 2) + '|']
    for k, label in _SIGNALS.items():
      if k in at:
        final = f'{s["dice"]["mean"]:.4f}' if k == 'dice' else ''
        lines.append(f'| {label} | ' + ' | '.join(f'{at[k][st]:.4f}' for st in steps) +
                     f' | {final} |')
    lines.append('')
  if rules:
    n = next(iter(rules.values()))['runs']
    lines += [f'Label-free stopping rules on every tracked run of this workdir ({n} runs, any '
              'table, none trained on the ground truth): Dice at the step each rule keeps against '
              'the best step of the same run (oracle).', '',
              '| rule | mean step kept | Dice kept | oracle Dice | mean gap | runs within 0.01 |',
              '| --- | --- | --- | --- | --- | --- |']
    for name, r in rules.items():
      lines.append(f'| {name} | {r["step"]:.0f} | {r["dice"]:.4f} | {r["oracle"]:.4f} | '
                   f'{r["gap"]:.4f} | {r["within_0.01"]}/{r["runs"]} |')
  return '\n'.join(lines) + '\n'
