"""Data parallelism, exact resume, preemption, and config checks of the train stage."""
import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from cgc_jax.core import paths
from cgc_jax.model import cgc
from cgc_jax.model import checkpoint
from cgc_jax.model import onednn
from cgc_jax.model import train_state
from cgc_jax.model import unet
from cgc_jax.runtime import distributed
from cgc_jax.stages import train
from cgc_jax.training import input_pipeline
from cgc_jax.training import step as step_lib

from conftest import copy_inputs
from conftest import tiny_config


def _batch(wd, cfg, step=0):
  prep = paths.prepared_store(cfg, wd)
  pl = paths.pl_store(cfg, wd)
  s = input_pipeline.CropSampler(prep, pl, pl.complete_cases(), cfg.train)
  return s.local_batch(step)


def _one_step(cfg, devices, batch):
  mesh = Mesh(np.asarray(devices), ('data',))
  tx, _ = train_state.make_optimizer(cfg.train)
  state = train_state.create_state(cfg, mesh, batch['image'].shape[-1], tx)
  step = step_lib.make_train_step(cfg, mesh, tx)
  gb = distributed.global_batch(batch, distributed.data_sharding(mesh))
  state, metrics = step(state, gb)
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [
    {},
    {'train.elr_lambda': 2.0},
    # cells contrasted within their mini-patch; a low threshold makes the tiny crops' 4x4x4
    # bottlenecks hold both classes
    {'cgc.fine_anchors': 'cell', 'cgc.cell_threshold': 0.02},
    # oneDNN's convolution (a foreign call: each device convolves the gathered batch)
    {'model.conv_impl': 'onednn'}])
def test_one_device_equals_eight_devices(tiny_workdir, overrides):
  assert jax.device_count() == 8
  if overrides.get('model.conv_impl') == 'onednn' and not onednn.available():
    pytest.skip(f'oneDNN convolutions not built here: {onednn.reason()}')
  cfg = tiny_config(**overrides)
  elr_lambda = cfg.train.elr_lambda
  batch = _batch(tiny_workdir, cfg)
  assert batch['p'].sum() > 0
  p1, m1 = _one_step(cfg, jax.devices()[:1], batch)
  p8, m8 = _one_step(cfg, jax.devices(), batch)
  for k in ('loss', 'seg', 'coarse', 'fine') + (('elr',) if elr_lambda else ()):
    assert float(m1[k]) == pytest.approx(float(m8[k]), abs=1e-5), k
  assert float(m1['fine']) > 0  # the global-batch contrastive loss is really exercised
  flat1, flat8 = jax.tree.leaves(p1), jax.tree.leaves(p8)
  for a, b in zip(flat1, flat8):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow  # a program of its own to compile (~30 s): the whole suite runs it
def test_a_step_with_onednn_convolutions_equals_one_with_sum2d(tiny_workdir):
  if not onednn.available():
    pytest.skip(f'oneDNN convolutions not built here: {onednn.reason()}')
  batch = _batch(tiny_workdir, tiny_config())
  (pa, ma), (pb, mb) = (_one_step(tiny_config(**{'model.conv_impl': impl}), jax.devices()[:1],
                                  batch) for impl in ('sum2d', 'onednn'))
  for k in ('loss', 'seg', 'coarse', 'fine'):
    assert float(mb[k]) == pytest.approx(float(ma[k]), abs=1e-5), k
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_loss_depends_on_other_devices_vectors(tiny_workdir):
  """The fine loss over 8 crops differs from the mean of per-crop losses: negatives cross
  devices."""
  cfg = tiny_config()
  batch = _batch(tiny_workdir, cfg)
  tx, _ = train_state.make_optimizer(cfg.train)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  state = train_state.create_state(cfg, mesh, 4, tx)
  f = jax.jit(functools.partial(step_lib.loss_fn, config=cfg))
  _, full = f(state.params, {k: jnp.asarray(v) for k, v in batch.items()})
  parts = [f(state.params, {k: jnp.asarray(v[i:i + 1]) for k, v in batch.items()})[1]
           for i in range(8)]
  assert abs(float(full['fine']) - np.mean([float(p['fine']) for p in parts])) > 1e-4


def test_teacher_is_the_bias_corrected_moving_average_of_the_parameters():
  tx = train_state.teacher_weights(0.5)
  params = {'w': jnp.asarray([2.0, -4.0])}
  state = tx.init(params)
  seen = []
  for value in ([2.0, -4.0], [4.0, 0.0], [0.0, 8.0]):
    params = {'w': jnp.asarray(value)}
    seen.append(np.asarray(value))
    updates, state = tx.update({'w': jnp.ones(2)}, state, params)
    np.testing.assert_allclose(np.asarray(updates['w']), [1.0, 1.0])  # updates untouched
  # ema = 0.125 * a + 0.25 * b + 0.5 * c (weights 0.5^3..); bias correction divides by 1 - 0.5^3
  want = (0.125 * seen[0] + 0.25 * seen[1] + 0.5 * seen[2]) / 0.875
  got, scale = train_state.teacher_params((None, state), 0.5)
  np.testing.assert_allclose(np.asarray(got['w']), want, rtol=1e-6)
  assert float(scale) == pytest.approx(0.875)


@pytest.mark.slow  # a program of its own to compile (~30 s): the whole suite runs it
def test_elr_step_adds_the_teacher_term(tiny_workdir):
  """With train.elr_lambda the optimiser state carries the teacher; after one step the teacher is
  the initial parameters (one average, bias-corrected), its targets' scale 1 - decay, and the step's
  loss equals the loss without ELR plus lambda times cgc.elr_loss against that teacher."""
  cfg = tiny_config()
  cfg.train.elr_lambda = 2.0
  batch = {k: jnp.asarray(v) for k, v in _batch(tiny_workdir, cfg).items()}
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  tx, _ = train_state.make_optimizer(cfg.train)
  state = train_state.create_state(cfg, mesh, batch['image'].shape[-1], tx)
  init = jax.device_get(state.params)
  state, _ = step_lib.make_train_step(cfg, mesh, tx)(state, batch)
  teacher, scale = train_state.teacher_params(state.opt_state, cfg.train.elr_decay)
  assert float(scale) == pytest.approx(1.0 - cfg.train.elr_decay)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(teacher)):
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-6)
  # each side one jitted program (op-by-op evaluation of the U-Net is several times slower)
  _, with_elr = jax.jit(lambda p, t: step_lib.loss_fn(p, batch, cfg, t))(state.params,
                                                                       (teacher, scale))
  plain_cfg = tiny_config()
  _, plain = jax.jit(lambda p: step_lib.loss_fn(p, batch, plain_cfg))(state.params)
  net, _, _ = unet.build(cfg.model)

  @jax.jit
  def reference(params, teacher, scale):
    logits, _ = net.apply({'params': params['unet']}, batch['image'])
    t_logits, _ = net.apply({'params': teacher['unet']}, batch['image'])
    return cgc.elr_loss(logits, t_logits, batch['brain'], scale)

  elr = float(reference(state.params, teacher, scale))
  assert elr < 0
  assert float(with_elr['elr']) == pytest.approx(elr, abs=1e-5)
  assert float(with_elr['loss']) == pytest.approx(float(plain['loss']) + 2.0 * elr, abs=1e-4)


def test_label_weight_multiplies_the_segmentation_weight(tiny_workdir):
  """A batch's label_weight (put there by train.symmetry_margin, train.quality_weight or
  train.ensemble_guide: input_pipeline.batch_keys): the segmentation terms weigh each voxel by
  brain x label_weight, as if the brain mask were that product, whatever the config reading it."""
  cfg = tiny_config(**{'train.symmetry_margin': 0.3})
  batch = {k: jnp.asarray(v) for k, v in _batch(tiny_workdir, cfg).items()}
  # every voxel of P and a fifth of the others: a weight that shifts the loss towards the lesion
  lw = jnp.asarray((np.asarray(batch['p']) > 0) |
                   (np.random.default_rng(0).random(batch['p'].shape) < 0.2), jnp.float32)
  batch['label_weight'] = lw
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  tx, _ = train_state.make_optimizer(cfg.train)
  state = train_state.create_state(cfg, mesh, batch['image'].shape[-1], tx)
  plain = tiny_config()
  seg = jax.jit(lambda p, b: step_lib.loss_fn(p, b, cfg)[1]['seg'])
  seg_plain = jax.jit(lambda p, b: step_lib.loss_fn(p, b, plain)[1]['seg'])
  want = float(seg_plain(state.params, {**batch, 'brain': batch['brain'] * lw}))
  assert float(seg(state.params, batch)) == pytest.approx(want, rel=1e-5)
  # a case weight alone (no symmetry rule) weighs the same way
  assert float(seg_plain(state.params, batch)) == pytest.approx(want, rel=1e-5)
  assert 'label_weight' in input_pipeline.batch_keys(tiny_config(**{
      'train.quality_weight': 0.5}).train)
  no_weight = {k: v for k, v in batch.items() if k != 'label_weight'}
  assert abs(float(seg_plain(state.params, no_weight)) - want) > 1e-3  # the weight matters here


@pytest.mark.slow  # a program of its own to compile (~30 s): the whole suite runs it
def test_target_correction_starts_at_its_step(tiny_workdir):
  """train.correct_threshold: before correct_start x steps the segmentation terms are taken against
  P, from that step on against cgc.corrected_target; train_step passes its own step to the loss."""
  cfg = tiny_config(**{'train.correct_threshold': 0.51, 'train.correct_start': 0.5,
                       'train.steps': 4})
  batch = {k: jnp.asarray(v) for k, v in _batch(tiny_workdir, cfg).items()}
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  tx, _ = train_state.make_optimizer(cfg.train)
  state = train_state.create_state(cfg, mesh, batch['image'].shape[-1], tx)
  net, _, _ = unet.build(cfg.model)
  logits, _ = net.apply({'params': state.params['unet']}, batch['image'])
  w = batch['brain']

  def seg(target):
    ce = (cgc.gce_loss(logits, target, w, cfg.train.gce_q) if cfg.train.gce_q else
          cgc.seg_loss(logits, target, w))
    return float(ce) + cfg.train.dice_weight * float(cgc.soft_dice_loss(logits, target, w))
  target = cgc.corrected_target(logits, batch['p'], 0.51, True)
  assert float(jnp.abs(target - batch['p']).sum()) > 0  # the correction changes labels here
  plain, corrected = seg(batch['p']), seg(target)
  assert abs(plain - corrected) > 1e-4
  step = step_lib.make_train_step(cfg, mesh, tx)
  for at, want in ((1, plain), (2, corrected)):  # the step donates its state: each call a copy
    fresh = jax.tree.map(jnp.copy, state)
    _, m = step(fresh.replace(step=jnp.asarray(at, state.step.dtype)), batch)
    assert float(m['seg']) == pytest.approx(want, abs=1e-5), at


class _Interrupt(Exception):
  pass


@pytest.mark.slow
def test_exact_resume_sigterm_finished_and_incompatible(tiny_workdir, tmp_path):
  cfg = tiny_config()
  ref_wd, wd = str(tmp_path / 'ref'), str(tmp_path / 'run')
  copy_inputs(tiny_workdir, ref_wd)
  copy_inputs(tiny_workdir, wd)
  ref = jax.device_get(train.train_and_evaluate(cfg, ref_wd).params)

  cfg_eval = tiny_config(**{'eval.every_steps': 1})

  def crash_at_4(params, step):  # a kill after the step-3 checkpoint, before step 6
    if step == 4:
      raise _Interrupt()
  with pytest.raises(_Interrupt):
    train.train_and_evaluate(cfg_eval, wd, crash_at_4)
  ck = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'), 3)
  assert ck.latest_step() == 3
  ck.close()

  def sigterm_at_5(params, step):
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(train.Preempted, match='saved step 5'):
    train.train_and_evaluate(cfg_eval, wd, sigterm_at_5)
  final = jax.device_get(train.train_and_evaluate(cfg, wd).params)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)
  # finished: nothing to do, same parameters back
  again = jax.device_get(train.train_and_evaluate(cfg, wd).params)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  # metrics log has one row per step, none duplicated by the restarts
  with open(os.path.join(wd, 'train', 'metrics.jsonl')) as f:
    steps = [int(line.split('"step": ')[1].split(',')[0]) for line in f]
  assert steps == [1, 2, 3, 4, 5, 6]
  # an incompatible config names the differing fields (with train.restart_when_stale off)
  bad = tiny_config(**{'cgc.tau': 0.5, 'train.lr': 0.01, 'train.restart_when_stale': False})
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
    train.train_and_evaluate(bad, wd)
  assert 'cgc.tau: 0.2 -> 0.5' in str(e.value) and 'train.lr' in str(e.value)
  # also when the parameters' shapes differ (checked before orbax meets a shape mismatch)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r'model.base: 4 -> 8'):
    train.train_and_evaluate(tiny_config(**{'model.base': 8, 'train.restart_when_stale': False}),
                             wd)
  # by default stale checkpoints are set aside (kept) and training starts over
  other = tiny_config(**{'train.lr': 0.01})
  new = jax.device_get(train.train_and_evaluate(other, wd).params)
  stale = [d for d in os.listdir(wd) if d.startswith('stale-')]
  assert len(stale) == 1
  assert sorted(os.listdir(os.path.join(wd, stale[0]))) == ['checkpoints', 'train']
  with open(os.path.join(wd, stale[0], 'train', 'metrics.jsonl')) as f:
    assert len(f.readlines()) == 6  # the old run's log went with its checkpoints
  with open(os.path.join(wd, 'train', 'metrics.jsonl')) as f:
    assert len(f.readlines()) == 6  # the new run from step 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(new)))
  rec = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'), 3).record(6)
  assert rec['convolution'] == train.convolution(other)  # the convolution that ran is recorded
  assert train.stale_reasons(rec, other, rec['inputs']) == []
  changed = dict(rec['inputs'], **{sorted(rec['inputs'])[0]: 'another digest'})
  assert train.stale_reasons(rec, other, changed) == [
      f'pseudo-labels of 1 case(s) changed since: {sorted(rec["inputs"])[0]}']


def test_a_resume_with_other_convolutions_says_so():
  cfg = tiny_config(**{'model.conv_impl': 'sum2d'})
  now = train.convolution(cfg)
  assert now == f'sum2d on cpu x {jax.device_count()}'
  assert train.convolution_change({'convolution': now}, cfg) is None
  assert train.convolution_change({}, cfg) is None  # a checkpoint from before the record
  msg = train.convolution_change({'convolution': 'onednn on cpu x 1'}, cfg)
  assert "'onednn on cpu x 1'" in msg and repr(now) in msg and 'bit for bit' in msg


@pytest.mark.slow
def test_exact_resume_with_onednn_convolutions(tiny_workdir, tmp_path):
  if not onednn.available():
    pytest.skip(f'oneDNN convolutions not built here: {onednn.reason()}')
  cfg = tiny_config(**{'model.conv_impl': 'onednn'})
  ref_wd, wd = str(tmp_path / 'ref'), str(tmp_path / 'run')
  copy_inputs(tiny_workdir, ref_wd)
  copy_inputs(tiny_workdir, wd)
  ref = jax.device_get(train.train_and_evaluate(cfg, ref_wd).params)

  def crash_at_4(params, step):  # after the step-3 checkpoint
    if step == 4:
      raise _Interrupt()
  with pytest.raises(_Interrupt):  # the callback runs at evaluation steps
    train.train_and_evaluate(tiny_config(**{'model.conv_impl': 'onednn', 'eval.every_steps': 1}),
                             wd, crash_at_4)
  final = jax.device_get(train.train_and_evaluate(cfg, wd).params)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_cases(tiny_workdir, tmp_path):
  cfg = tiny_config(**{'train.lr': 1e30, 'train.grad_clip': 1e30, 'train.warmup_steps': 0})
  wd = str(tmp_path / 'nan')
  copy_inputs(tiny_workdir, wd)
  with pytest.raises(train.NonFiniteError, match=r'step \d+: non-finite .*batch cases \[.phantom'):
    train.train_and_evaluate(cfg, wd)


def test_checkpoints_in_the_layout_with_rng_still_restore(tmp_path):
  """Checkpoints written while TrainState still held an (unused) rng restore into today's state,
  values unchanged; today's layout restores as it was saved."""
  cfg = tiny_config()
  mesh = distributed.mesh()
  tx, _ = train_state.make_optimizer(cfg.train)
  nch = len(cfg.data.modalities)
  state = train_state.create_state(cfg, mesh, nch, tx)
  abstract = train_state.abstract_state(cfg, mesh, nch, tx)
  assert not hasattr(state, 'rng')
  old = train_state.LegacyTrainState(step=state.step + 5, params=state.params,
                                     opt_state=state.opt_state,
                                     rng=jnp.array([7, 9], jnp.uint32))
  ck = checkpoint.Checkpointer(str(tmp_path), 3, async_save=False)
  ck.save(5, old, {'data_step': 5})
  ck.save(6, state.replace(step=state.step + 6), {'data_step': 6})
  ck.wait()
  for step in (5, 6):
    got, record, s = ck.restore(abstract, step)
    assert type(got) is train_state.TrainState and s == step and int(got.step) == step
    assert record == {'data_step': step}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params),
                 jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.opt_state),
                 jax.device_get(state.opt_state))
  ck.close()
