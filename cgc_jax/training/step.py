"""The loss and the one pure jitted train step, written once for any mesh.

`train_step(state, batch) -> (state, metrics)`: the batch is sharded along the mesh's `data` axis,
the state is replicated and donated, and the CGC losses reduce over the global batch (XLA inserts
the collectives).
"""
import functools

import jax
import jax.numpy as jnp
import optax

from cgc_jax.model import cgc
from cgc_jax.model import train_state
from cgc_jax.model import unet
from cgc_jax.runtime import distributed


def loss_fn(params, batch, config, teacher=None, step=0):
  """Total CGC loss and its components for one global batch.

  batch: image f32[B, X, Y, Z, C], p and brain u8 or f32[B, X, Y, Z] (and posterior
  f32[B, X, Y, Z], P's soft posterior, when train.confidence_gamma > 0; label_weight
  f32[B, X, Y, Z], the per-voxel weight of the segmentation loss, when
  input_pipeline.batch_keys has it: 0 on P's left-right symmetric voxels, the case's weight).
  teacher: (parameters of the same form as params, target scale f32[]) when train.elr_lambda > 0,
  the early-learning regulariser's teacher (train_state.teacher_params). step: i32[] the optimiser
  step (the target correction, train.correct_threshold, acts from train.correct_start x
  train.steps on).
  """
  net, coarse_head, proj_head = unet.build(config.model)
  batch = {k: v.astype(jnp.float32) if v.dtype == jnp.uint8 else v for k, v in batch.items()}
  logits, feats = net.apply({'params': params['unet']}, batch['image'])
  t = config.train
  weight = batch['brain'] if t.loss_region == 'brain' else jnp.ones_like(batch['p'])
  if t.confidence_gamma:
    weight = weight * cgc.confidence_weight(batch['posterior'], t.confidence_gamma)
  if 'label_weight' in batch:  # symmetric voxels, case weights, the ensemble's guide (static key)
    weight = weight * batch['label_weight']
  target = cgc.bootstrap_target(logits, batch['p'], t.bootstrap) if t.bootstrap else batch['p']
  if t.get('correct_threshold', 0.0):
    active = step >= int(round(t.correct_start * t.steps))
    target = cgc.corrected_target(logits, target, t.correct_threshold, active)
  if t.gce_q:
    l_seg = cgc.gce_loss(logits, target, weight, t.gce_q)
  else:
    l_seg = cgc.seg_loss(logits, target, weight)
  if t.dice_weight:
    l_dice = cgc.soft_dice_loss(logits, target, weight)
    l_seg = l_seg + t.dice_weight * l_dice
  if t.elr_lambda:
    teacher_logits, _ = net.apply({'params': teacher[0]['unet']}, batch['image'])
    l_elr = cgc.elr_loss(logits, teacher_logits, weight, teacher[1])
    l_seg = l_seg + t.elr_lambda * l_elr
  k = config.cgc
  lesion, normal = cgc.cell_masks(batch['p'], batch['brain'], feats.shape[1:4], k.cell_threshold,
                                  k.normal_in_brain)
  metrics = {'seg': l_seg, 'lesion_cells': lesion.mean()}
  if t.elr_lambda:
    metrics['elr'] = l_elr
  total = l_seg
  if k.coarse:
    vecs, labels, valid = cgc.region_vectors(feats, lesion, normal)
    logits_c = coarse_head.apply({'params': params['coarse']}, vecs)
    l_coarse = cgc.coarse_loss(logits_c, labels, valid)
    total = total + k.lambda_coarse * l_coarse
    metrics['coarse'] = l_coarse
  if k.fine:
    if k.fine_anchors == 'cell':
      cells, labels, valid = cgc.patch_cells(feats, lesion, normal, tuple(k.patch))
      z = proj_head.apply({'params': params['proj']}, cells)
      l_fine = cgc.local_supcon_loss(z, labels, valid, k.tau)
    elif k.fine_anchors == 'patch':
      vecs, labels, valid = cgc.patch_vectors(feats, lesion, normal, tuple(k.patch))
      z = proj_head.apply({'params': params['proj']}, vecs)
      l_fine = cgc.supcon_loss(z, labels, valid, k.tau)
    else:
      raise ValueError(f'cgc.fine_anchors must be patch or cell, not {k.fine_anchors!r}')
    total = total + k.lambda_fine * l_fine
    metrics['fine'] = l_fine
    metrics['fine_floor'] = cgc.supcon_floor(labels, valid, k.tau)
  metrics['loss'] = total
  return total, metrics


def train_step(state: train_state.TrainState, batch, *, config, tx):
  """One optimiser step. Pure: (state, batch) -> (new state, metrics). No randomness: the model is
  deterministic and augmentation happens on the host (input_pipeline)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  t = config.train
  teacher = (train_state.teacher_params(state.opt_state, t.elr_decay) if t.elr_lambda else None)
  (_, metrics), grads = grad_fn(state.params, batch, config, teacher, state.step)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = optax.tree.norm(grads)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(config, mesh, tx):
  repl, data = distributed.replicated(mesh), distributed.data_sharding(mesh)
  step = jax.jit(functools.partial(train_step, config=config, tx=tx),
                 in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
  if mesh.devices.size > 1 and unet.resolve_conv_impl(config.model.conv_impl) == 'onednn':
    return distributed.OnMesh(step, mesh)  # oneDNN per device on its rows of the batch
  return step
