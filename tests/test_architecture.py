"""The package's layers: which subpackage may import which, where JAX and torch may appear, and
that the offline stages' workers never load JAX. One table, checked on the source."""
import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT

# Bottom to top. A module may import modules of the layers below its own, of its own layer
# (except `stages`: no stage imports another), and cgc_jax.errors, the leaf every layer may raise.
LAYERS = ('core', 'runtime', 'imaging', 'labels', 'model', 'training', 'inference', 'stages',
          'top', 'studies')
TOP = ('main', 'pipeline', 'segmenter')  # cgc_jax/<name>.py: the entry points and the API
LEAF = ('errors', '__init__')
NO_JAX = ('core', 'imaging', 'labels')  # host code: NumPy only, cheap to import in workers
JAX_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax')


def layer_of(module: str) -> str:
  """'cgc_jax.model.unet' -> 'model'; 'cgc_jax.pipeline' -> 'top'; 'cgc_jax.errors' -> 'leaf'."""
  parts = module.split('.')
  if len(parts) == 2 and parts[1] in LEAF:
    return 'leaf'
  if len(parts) == 2 and parts[1] in TOP:
    return 'top'
  if len(parts) >= 2 and parts[1] in LAYERS:
    return parts[1]
  raise ValueError(f'{module}: not in any layer of the table')


def modules(root: str) -> dict:
  """{dotted module name: source path} of every module under root/cgc_jax."""
  out = {}
  for path in glob.glob(os.path.join(root, 'cgc_jax', '**', '*.py'), recursive=True):
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
    out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
  return out


def imports(path: str, known) -> set:
  """Every module `path` imports, at module level or inside functions; cgc_jax names resolved
  against `known` (from cgc_jax.model import unet -> cgc_jax.model.unet)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      for a in node.names:
        full = f'{node.module}.{a.name}'
        out.add(full if full in known else node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
  return out


def violations(root: str) -> list:
  """'importer -> imported (reason)' for every import against the table."""
  mods = modules(root)
  out = []
  for name, path in sorted(mods.items()):
    if name == 'cgc_jax':
      continue
    mine = layer_of(name)
    for dep in sorted(imports(path, mods)):
      top_package = dep.split('.')[0]
      if top_package in JAX_PACKAGES and mine in NO_JAX:
        out.append(f'{name} -> {dep} (the {mine} layer is host code without JAX)')
      if top_package == 'torch' and name != 'cgc_jax.studies.torch_peer':
        out.append(f'{name} -> {dep} (torch only in the benchmark peer)')
      if top_package != 'cgc_jax' or dep == 'cgc_jax' or dep.startswith(name + '.'):
        continue
      theirs = layer_of(dep)
      if theirs == 'leaf':
        continue
      if mine == 'leaf':
        out.append(f'{name} -> {dep} (errors imports nothing of cgc_jax)')
      elif LAYERS.index(theirs) > LAYERS.index(mine):
        out.append(f'{name} -> {dep} ({mine} may not import the {theirs} layer above it)')
      elif mine == theirs == 'stages' and dep != 'cgc_jax.stages':
        out.append(f'{name} -> {dep} (no stage imports another)')
  return out


def test_every_import_follows_the_layers():
  assert len(modules(ROOT)) > 40
  assert violations(ROOT) == []


def test_an_import_against_the_direction_is_caught(tmp_path):
  """The checker itself: a core module importing a stage, a stage importing another, an imaging
  module importing JAX, and torch outside the peer are each reported; a downward import is not."""
  for sub in ('core', 'imaging', 'stages', 'model'):
    os.makedirs(tmp_path / 'cgc_jax' / sub)
    (tmp_path / 'cgc_jax' / sub / '__init__.py').write_text('')
  (tmp_path / 'cgc_jax' / '__init__.py').write_text('')
  (tmp_path / 'cgc_jax' / 'errors.py').write_text('')
  files = {
      'core/paths.py': 'from cgc_jax import errors\n',
      'core/store.py': 'def f():\n  from cgc_jax.stages import train\n',
      'imaging/nifti.py': 'import jax.numpy as jnp\nfrom cgc_jax.core import paths\n',
      'stages/train.py': 'from cgc_jax.model import unet\n',
      'stages/evaluate.py': 'from cgc_jax.stages import train\n',
      'model/unet.py': 'import torch\n',
  }
  for rel, text in files.items():
    (tmp_path / 'cgc_jax' / rel).write_text(text)
  assert violations(str(tmp_path)) == [
      'cgc_jax.core.store -> cgc_jax.stages.train (core may not import the stages layer above it)',
      'cgc_jax.imaging.nifti -> jax.numpy (the imaging layer is host code without JAX)',
      'cgc_jax.model.unet -> torch (torch only in the benchmark peer)',
      'cgc_jax.stages.evaluate -> cgc_jax.stages.train (no stage imports another)',
  ]


def _loaded(code: str) -> str:
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  return r.stdout.strip()


def test_offline_stage_modules_do_not_load_jax():
  """Worker processes of prepare and pseudo_labels import these; they must not pay for JAX."""
  mods = ['cgc_jax.stages.prepare', 'cgc_jax.stages.pseudo_labels', 'cgc_jax.pipeline',
          'cgc_jax.runtime.workers', 'cgc_jax.runtime.bookkeeping', 'cgc_jax.errors'] + sorted(
              m for m in modules(ROOT) if m != 'cgc_jax' and layer_of(m) in NO_JAX)
  code = ('import sys\n' + ''.join(f'import {m}\n' for m in mods) +
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "orbax")))')
  assert _loaded(code) == '[]'


def test_the_product_never_imports_torch():
  """torch is a benchmark-only peer (studies.torch_peer): every other module outside the studies,
  the entry points included, loads without it."""
  mods = sorted(m for m in modules(ROOT) if m != 'cgc_jax' and layer_of(m) != 'studies'
                and not m.endswith('.main'))
  code = ('import sys\n' + ''.join(f'import {m}\n' for m in mods) + 'import cgc_jax.main\n'
          'print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))')
  assert len(mods) > 30
  assert _loaded(code) == '[]'
