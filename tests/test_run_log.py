import glob
import json
import os
import struct

from tensorboardX.proto import event_pb2

from cgc_jax.training import run_log


def _events(logdir):
  """Every (tag, step, value) in the TFRecord event files under logdir, in file order."""
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    data = open(path, 'rb').read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])  # length, its crc, record, crc
      i += 12 + n + 4
      for v in ev.summary.value:
        out.append((v.tag, ev.step, v.simple_value))
  return out


def test_scalars_in_event_files_jsonl_and_curves(tmp_path):
  wd = str(tmp_path)
  log = run_log.RunLog(wd, 0)
  for step in (5, 10, 15):
    log.write(step, {'time': 1.0 * step, 'loss': 1.0 / step, 'seg': 0.5 / step, 'lr': 1e-3,
                     'grad_norm': 2.0})
  log.track(10, {'flip_agreement': 0.7, 'p_agreement': 0.8})
  log.close()
  ev = _events(os.path.join(wd, 'train', 'tensorboard'))
  loss = [(s, v) for t, s, v in ev if t == 'train/loss']
  assert [s for s, _ in loss] == [5, 10, 15]
  assert abs(loss[1][1] - 0.1) < 1e-7
  assert {t for t, _, _ in ev} >= {
      'train/seg', 'train/lr', 'train/grad_norm', 'track/flip_agreement', 'track/p_agreement'
  }
  assert 'train/time' not in {t for t, _, _ in ev}
  rows = [json.loads(line) for line in open(os.path.join(wd, 'train', 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [5, 10, 15]
  assert os.path.getsize(os.path.join(wd, 'train', 'curves.png')) > 1000
  # a run resumed from step 10 drops the rows past it
  log = run_log.RunLog(wd, 10)
  log.write(15, {'time': 0.0, 'loss': 0.05})
  log.close()
  rows = [json.loads(line) for line in open(os.path.join(wd, 'train', 'metrics.jsonl'))]
  assert [(r['step'], r['loss']) for r in rows][-2:] == [(10, 0.1), (15, 0.05)]
