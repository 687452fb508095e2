"""Every command the README and docs/*.md show is checked against the program it runs: the module or
script exists, each --flag is one it defines (a renamed flag fails here), enum values are among
its choices, and every --config.section.field exists in the config it names. Two run for real at
smoke size (below); the rest need data, hours, a GPU or a cluster, which is why they are checked
rather than run. docs/experiments/ is the dated history: its commands keep their day's flags."""
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = ['README.md', 'launch/README.md'] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
SCRIPTS = {'launch/local.sh', 'launch/slurm.sbatch', 'launch/tpu_pod.sh', 'launch/gpu_bench.sh'}
# What prints a program's flags: {flag: [enum choices] or None}, in a process of its own (the
# programs define flags of the same names).
_FLAGS_OF = '''
import importlib, json, sys
from absl import flags
m = importlib.import_module(sys.argv[1])
getattr(m, '_define_flags', lambda: None)()
out = {}
for name, f in flags.FLAGS._flags().items():
  out[name] = list(getattr(f.parser, 'enum_values', None) or []) or None
print(json.dumps(out))
'''


def commands(text: str) -> list:
  """The cgc_jax commands in a markdown text: lines of fenced code blocks (continuations joined,
  comments dropped, `&&` chains split) and inline code spans that run cgc_jax."""
  found = []
  for block in re.findall(r'```[a-z]*\n(.*?)```', text, re.S):
    for line in re.sub(r'\\\n\s*', ' ', block).split('\n'):
      found += [p.strip() for p in line.split('#')[0].split('&&')]
  for span in re.findall(r'`([^`\n]+)`', text):
    found += [p.strip() for p in span.split('&&')]
  return [c for c in found if re.search(r'(python -m cgc_jax|^cgc-jax\b|launch/\S+)', c)]


def _program(tokens: list):
  """(module, the flag tokens) of a command, or (None, []) when it runs no cgc_jax program."""
  for i, t in enumerate(tokens):
    if t == '-m' and i + 1 < len(tokens) and tokens[i + 1].startswith('cgc_jax'):
      return tokens[i + 1], tokens[i + 2:]
    if t == 'cgc-jax':
      return 'cgc_jax.main', tokens[i + 1:]
    if t.startswith('launch/'):
      return t, tokens[i + 1:]
  return None, []


def _load_config(path: str):
  """The ConfigDict of a configs/*.py file (a shipped name such as `demo` too), or None for a
  placeholder such as CONFIG."""
  from cgc_jax import pipeline  # pylint: disable=g-import-not-at-top
  path = pipeline.resolve_config([f'--config={path}'])[0][len('--config='):].split(':')[0]
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.exists(full):
    return None
  spec = importlib.util.spec_from_file_location('doc_config', full)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _fields(c, prefix='') -> set:
  out = set()
  for k in c.keys():
    out.add(prefix + k)
    if hasattr(c[k], 'keys'):
      out |= _fields(c[k], f'{prefix}{k}.')
  return out


def _with_overrides(c, overrides: dict):
  """c with {'a.b': 'text'} set (values read as Python literals where they parse)."""
  import ast  # pylint: disable=g-import-not-at-top
  c = c.copy_and_resolve_references()
  for key, text in overrides.items():
    if re.fullmatch(r'[A-Z]+', text):  # a placeholder such as S (a seed) or N
      continue
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *path, last = key.split('.')
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _rule_problems(module: str, args: list, config) -> list:
  """What the config rules refuse in the config this command runs (each row's, for a table)."""
  from cgc_jax.core import config_rules  # pylint: disable=g-import-not-at-top
  overrides = {a[len('--config.'):].split('=', 1)[0]: a.split('=', 1)[1] for a in args
               if a.startswith('--config.') and '=' in a}
  c = _with_overrides(config, overrides)
  if module != 'cgc_jax.studies.experiments':
    return config_rules.problems(c) if module == 'cgc_jax.main' else []
  from cgc_jax.studies import experiments, tables  # pylint: disable=g-import-not-at-top
  table = next((a.split('=', 1)[1] for a in args if a.startswith('--table=')), 'methods')
  picks = next((a.split('=', 1)[1] for a in args if a.startswith('--rows=')), '')
  out = []
  for name in table.split('|'):
    rows = tables.TABLES.get(name, [])
    for row in tables.select_rows(rows, picks) if picks and rows else rows:
      out += [f'table {name}, row "{row.name}": {p}' for p in config_rules.problems(
          experiments.trained_config(c, row, 0)) if row.kind == 'train']
  return out


_flag_cache = {}


def flags_of(module: str) -> dict:
  if module not in _flag_cache:
    r = subprocess.run([sys.executable, '-c', _FLAGS_OF, module], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert r.returncode == 0, r.stderr[-2000:]
    _flag_cache[module] = json.loads(r.stdout.strip().splitlines()[-1])
  return _flag_cache[module]


def problems(command: str) -> list:
  """What in `command` does not match the program it runs ([] when everything does)."""
  try:
    tokens = shlex.split(command)
  except ValueError:
    tokens = command.split()
  module, args = _program(tokens)
  if module is None:
    return []
  if module.startswith('launch/'):
    if module not in SCRIPTS or not os.path.exists(os.path.join(ROOT, module)):
      return [f'{module}: no such launch script']
    module = 'cgc_jax.main'  # the scripts pass their flags on to the main job
    args = [a for a in args if a.startswith('--')]
  if importlib.util.find_spec(module) is None:
    return [f'{module}: no such module']
  known = flags_of(module)
  out = []
  config = next((a.split('=', 1)[1] for a in args if a.startswith('--config=')), None)
  loaded = _load_config(config) if config else None
  fields = _fields(loaded) if loaded is not None else None
  for a in args:
    if not a.startswith('--'):
      continue
    name, _, value = a[2:].partition('=')
    if name.startswith('config.'):
      if fields is not None and name[len('config.'):] not in fields:
        out.append(f'{a}: {config} has no field {name[len("config."):]}')
      continue
    base = name[2:] if name.startswith('no') and name[2:] in known else name
    if base not in known:
      out.append(f'{a}: {module} has no flag --{name}')
    elif known[base] and value and not set(value.split('|')) <= set(known[base]):
      out.append(f'{a}: --{base} takes {known[base]}')
  if loaded is not None and not out:
    out += _rule_problems(module, args, loaded)
  return out


def _all_commands():
  return [(doc, c) for doc in DOCS for c in commands(open(os.path.join(ROOT, doc)).read())]


def test_every_documented_command_matches_its_program():
  found = _all_commands()
  assert len(found) > 25 and {d for d, _ in found} >= {'README.md', 'docs/usage.md'}
  bad = [f'{doc}: {c}\n    ' + '\n    '.join(p) for doc, c in found for p in [problems(c)] if p]
  assert not bad, '\n'.join(bad)


def test_a_renamed_flag_or_field_or_table_is_caught():
  good = 'python -m cgc_jax.main --config=configs/demo.py --workdir=w --config.train.steps=3'
  assert problems(good) == []
  assert problems(good.replace('--workdir', '--work_dir')) == [
      '--work_dir=w: cgc_jax.main has no flag --work_dir']
  assert problems(good.replace('train.steps', 'train.step')) == [
      '--config.train.step=3: configs/demo.py has no field train.step']
  assert problems('python -m cgc_jax.studies.experiments --config=X --workdir=w --table=nosuch') \
      == ['--table=nosuch: --table takes ' + str(flags_of('cgc_jax.studies.experiments')['table'])]
  assert problems('python -m cgc_jax.nosuch --x=1') == ['cgc_jax.nosuch: no such module']
  assert problems('launch/nosuch.sh 2 2 --config=configs/demo.py') == [
      'launch/nosuch.sh: no such launch script']


@pytest.mark.slow
def test_documented_commands_run_at_smoke_size(tmp_path):
  """The train benchmark on the demo config and the protocol's command, run for real at a tiny
  size (the flags the docs show, plus size overrides)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  r = subprocess.run([sys.executable, '-m', 'cgc_jax.studies.benchmark', '--what=train',
                      '--config=configs/demo.py', '--steps=1', '--config.model.base=2',
                      '--config.model.levels=2', '--config.train.crop=(8,8,8)',
                      '--config.cgc.patch=(2,2,2)', '--config.train.batch_size=1'],
                     cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert r.returncode == 0 and '| train step |' in r.stdout, r.stderr[-3000:]
  for row, dice in (('configured_recipe_every_default_on', 0.5), ('one_network', 0.6)):
    d = tmp_path / 'experiments' / 'defaults' / row / 'seed0' / 'eval'
    d.mkdir(parents=True)
    (d / 'summary.json').write_text(json.dumps(
        {'cases': [{'case': f'case_{i}', 'net_dice': dice + 0.01 * i} for i in range(4)]}))
  r = subprocess.run([sys.executable, '-m', 'cgc_jax.studies.protocol', f'--dev={tmp_path}'],
                     cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 0 and '| one_network | 0 | +0.1000 | +0.1000 |' in r.stdout, r.stderr
