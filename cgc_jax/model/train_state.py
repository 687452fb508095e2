"""The training state (step, parameters, optimiser state), the optimiser, and how to create the
state on a device mesh or describe it for a restore. Shared by training, evaluation and benchmarks.
"""
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from cgc_jax.model import unet
from cgc_jax.runtime import distributed


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]
  params: Any
  opt_state: Any


@flax.struct.dataclass
class LegacyTrainState:
  """The state as checkpoints made before 2026-12 hold it: with an `rng` (u32[2]) never read.
  checkpoint.Checkpointer.restore reads such checkpoints through it and drops `rng`."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def abstract(cls, state: TrainState) -> 'LegacyTrainState':
    """The legacy layout of an abstract TrainState (rng: u32[2], sharded like `step`)."""
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=getattr(state.step, 'sharding', None))
    return cls(step=state.step, params=state.params, opt_state=state.opt_state, rng=rng)

  def current(self) -> TrainState:
    return TrainState(step=self.step, params=self.params, opt_state=self.opt_state)


class TeacherState(NamedTuple):
  count: jax.Array  # i32[], updates seen
  ema: Any  # the moving average of the parameters, biased towards their initial values


def teacher_weights(decay: float):
  """An optax transformation that leaves the updates alone and keeps in its state the moving
  average of the parameters it is given (the values before each step): ema <- decay * ema +
  (1 - decay) * params. `teacher_params` reads the bias-corrected average."""
  def init(params):
    return TeacherState(count=jnp.zeros((), jnp.int32), ema=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params):
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    return updates, TeacherState(count=state.count + 1, ema=ema)

  return optax.GradientTransformation(init, update)


def teacher_params(opt_state, decay: float):
  """The teacher of early-learning regularisation: (params, scale). params: the bias-corrected
  moving average of the parameters (ema / (1 - decay**count)) held by `teacher_weights`, the last
  link of the chain that `make_optimizer` builds when train.elr_lambda > 0 (before the first
  update: the state's zeros). scale = 1 - decay**count, f32[]: the weight a moving average of
  predictions started at zero, as the paper's targets are, would give them by now."""
  state = opt_state[-1]
  scale = 1.0 - jnp.power(decay, state.count.astype(jnp.float32))
  correction = jnp.maximum(scale, 1.0 - decay)
  return jax.tree.map(lambda e: e / correction, state.ema), scale


def make_optimizer(tcfg):
  """AdamW on a warm-up + cosine schedule with global-norm clipping; with train.elr_lambda > 0,
  followed by `teacher_weights` (the optimiser state then also holds the teacher)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, tcfg.lr, tcfg.warmup_steps,
                                             max(tcfg.steps, tcfg.warmup_steps + 1),
                                             end_value=tcfg.lr * tcfg.end_lr_fraction)
  links = [optax.clip_by_global_norm(tcfg.grad_clip),
           optax.adamw(sched, weight_decay=tcfg.weight_decay)]
  if tcfg.get('elr_lambda', 0.0):
    links.append(teacher_weights(tcfg.elr_decay))
  return optax.chain(*links), sched


def init_params(config, rng, num_channels: int):
  net, coarse, proj = unet.build(config.model)
  crop = tuple(config.train.crop)
  k1, k2, k3 = jax.random.split(rng, 3)
  x = jnp.zeros((1,) + crop + (num_channels,), jnp.float32)
  feat_dim = config.model.base * 2**(config.model.levels - 1)
  v = jnp.zeros((1, feat_dim), jnp.float32)
  return {'unet': net.init(k1, x)['params'], 'coarse': coarse.init(k2, v)['params'],
          'proj': proj.init(k3, v)['params']}


def _init_fn(config, num_channels: int, tx):
  def init():
    # parameters from XLA's RngBitGenerator ('rbg'): the same values on every device, and the init
    # program compiles in about 2 s instead of about 12 s with threefry on CPU
    params = init_params(config, jax.random.key(config.train.seed, impl='rbg'), num_channels)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def create_state(config, mesh, num_channels: int, tx) -> TrainState:
  """Initialises the replicated state directly on the mesh (no host copy)."""
  return jax.jit(_init_fn(config, num_channels, tx),
                 out_shardings=distributed.replicated(mesh))()


def abstract_state(config, mesh, num_channels: int, tx) -> TrainState:
  """The state's shapes, dtypes and (replicated) shardings, for restoring: nothing is computed."""
  shapes = jax.eval_shape(_init_fn(config, num_channels, tx))
  repl = distributed.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)
