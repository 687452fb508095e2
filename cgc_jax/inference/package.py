"""A trained model as one portable file: what `--mode=export` writes and `--mode=predict
--model=FILE` and `Segmenter.from_package` read.

The package is a zip archive:
  manifest.json          format, format_version, cgc_jax/jax/flax versions, the networks' selected
                         checkpoint steps, the cases each network trained on (count), the
                         modalities, and the sha256 of every other member
  config.json            the run's resolved config (what predict needs: data, gmm, model, eval)
  networks/<i>.msgpack   network i's U-Net parameters (flax.serialization msgpack, float32), no
                         optimiser state: one network, the folds of cross-fitting or an ensemble,
                         their mean segmenting a new scan as it does from the workdir

A package is smaller than the checkpoints it comes from (no Adam moments, one step per network)
and independent of the workdir: predicting from it gives the same masks, voxel for voxel.
"""
import hashlib
import io
import json
import os
import time
import zipfile

from absl import logging
import flax
from flax import serialization
from flax import traverse_util
import jax
import ml_collections
import numpy as np

from cgc_jax import errors
from cgc_jax.core import store as store_lib
from cgc_jax.inference import restore
from cgc_jax.model import train_state

FORMAT = 'cgc_jax-model'
FORMAT_VERSION = 1


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def export(config, workdir: str, output: str, mesh) -> dict:
  """Writes `output` (a .zip) from the networks `config` evaluates in `workdir` (eval.step /
  eval.select as evaluate restores them). Atomic: a partial file is never left under `output`.
  Returns the manifest."""
  from cgc_jax import __version__  # pylint: disable=g-import-not-at-top
  if not output:
    raise errors.StageError('--mode=export needs --output=FILE.zip')
  nch = len(config.data.modalities)
  nets, step = restore.restore_networks(config, workdir, mesh, nch)
  members = {'config.json': json.dumps(json.loads(config.to_json_best_effort()), indent=1,
                                       sort_keys=True).encode()}
  for i, (params, _) in enumerate(nets):
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
    members[f'networks/{i}.msgpack'] = serialization.msgpack_serialize(
        serialization.to_state_dict(host))
  manifest = {
      'format': FORMAT, 'format_version': FORMAT_VERSION, 'cgc_jax': __version__,
      'jax': jax.__version__, 'flax': flax.__version__,
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'workdir': os.path.abspath(workdir), 'steps': step if isinstance(step, list) else
      [step] * len(nets), 'networks': len(nets),
      'trained_cases': [len(seen) for _, seen in nets],
      'modalities': list(config.data.modalities),
      'sha256': {name: _sha(data) for name, data in members.items()}}
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('manifest.json', json.dumps(manifest, indent=1))
    for name, data in members.items():
      z.writestr(name, data)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  store_lib.atomic_write_bytes(output, buf.getvalue())
  logging.info('export: %d network(s) at step %s -> %s (%.1f MB)', len(nets), step, output,
               len(buf.getvalue()) / 1e6)
  return manifest


def read(path: str) -> tuple:
  """-> (config, [U-Net params as nested dicts of f32 numpy arrays, one per network], manifest).
  Raises StageError naming the file when it is not a readable package of this format or a member
  does not match its recorded digest."""
  try:
    with zipfile.ZipFile(path) as z:
      manifest = json.loads(z.read('manifest.json'))
      if manifest.get('format') != FORMAT:
        raise errors.StageError(f'{path}: not a cgc_jax model package (format '
                                f'{manifest.get("format")!r})')
      if int(manifest.get('format_version', 0)) > FORMAT_VERSION:
        raise errors.StageError(f'{path}: package format {manifest["format_version"]} is newer '
                                f'than this cgc_jax reads ({FORMAT_VERSION}): upgrade cgc_jax')
      data = {name: z.read(name) for name in manifest['sha256']}
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise errors.StageError(f'{path}: unreadable model package: {e}') from e
  bad = [n for n, d in data.items() if _sha(d) != manifest['sha256'][n]]
  if bad:
    raise errors.StageError(f'{path}: corrupt model package: {", ".join(bad)} do not match their '
                            'recorded sha256')
  config = ml_collections.ConfigDict(json.loads(data['config.json']))
  params = [serialization.msgpack_restore(data[f'networks/{i}.msgpack'])
            for i in range(int(manifest['networks']))]
  return config, params, manifest


def placed(config, params: list, mesh, path: str = '') -> list:
  """The packaged networks replicated on `mesh`, each checked against the U-Net `config` builds
  (tree and shapes): a package whose parameters do not fit its config is an error naming it."""
  tx, _ = train_state.make_optimizer(config.train)
  want = train_state.abstract_state(config, mesh, len(config.data.modalities), tx).params['unet']
  want_shapes = {k: tuple(v.shape) for k, v in
                 traverse_util.flatten_dict(serialization.to_state_dict(want)).items()}
  out = []
  for i, p in enumerate(params):
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(p).items()}
    if got != want_shapes:
      raise errors.StageError(f'{path}: network {i}\'s parameters do not fit the U-Net of the '
                              'packaged config')
    tree = serialization.from_state_dict(want, p)
    out.append(jax.tree.map(lambda a, s: jax.device_put(np.asarray(a, s.dtype), s.sharding), tree,
                            want))
  return out
