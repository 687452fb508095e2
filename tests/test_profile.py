"""The per-op profile of the train step: HLO ops grouped by their JAX op names."""
import numpy as np
import pytest

from cgc_jax.studies import profile

from conftest import tiny_config

_HLO = '\n'.join([
    'ENTRY %main {',
    '  %ffi_call.53 = f32[2,8]{1,0} custom-call(%a, %b), custom_call_target="cgc_onednn_conv_fwd",'
    ' metadata={op_name="jit(train_step)/jvp(UNet3D)/DoubleConv_6/Conv3_0/ffi_call" '
    'stack_frame_id=1}',
    '  %broadcast_subtract_fusion.13 = f32[2,8]{1,0} fusion(%x), kind=kLoop, calls=%f, metadata='
    '{op_name="jit(train_step)/transpose(jvp(UNet3D))/DoubleConv_0/InstanceNorm_1/sub"}',
    '  %copy_bitcast_fusion = f32[64]{0} fusion(%y), kind=kLoop, metadata={op_name="jit(train_'
    'step)/transpose(jvp(UNet3D))/UpConv_2/bxyzc,ijkcf->bxiyjzkf/transpose"}',
    '  %convolution = f32[8,1,1,1,2]{4,3,2,1,0} convolution(%p, %q), window={size=48x64x48}',
    '  %maximum_fusion = f32[2]{0} fusion(%z), kind=kLoop, metadata={op_name="jit(train_step)/'
    'jvp(UNet3D)/DoubleConv_0/jit(relu)/max"}',
    '  %div_fusion = f32[2]{0} fusion(%w), kind=kLoop, metadata={op_name="jit(train_step)/jvp()/'
    'div"}',
    '  ROOT %add.7 = f32[2]{0} add(%u, %v), metadata={op_name="jit(train_step)/add"}',
    '}'])


def test_ops_are_grouped_by_their_op_names():
  ops = profile.op_table(_HLO)
  assert ops['ffi_call.53'] == ('custom-call', 'jit(train_step)/jvp(UNet3D)/DoubleConv_6/Conv3_0/'
                                'ffi_call', 'cgc_onednn_conv_fwd')
  want = {'ffi_call.53': 'convolutions', 'broadcast_subtract_fusion.13': 'normalisation',
          'copy_bitcast_fusion': 'up-convolutions', 'convolution': 'convolutions',
          'maximum_fusion': 'activation', 'div_fusion': 'losses and CGC', 'add.7': 'optimiser'}
  assert {k: profile.group_of(*v) for k, v in ops.items()} == want
  durations = {'ffi_call.53': 100.0, 'broadcast_subtract_fusion.13': 30.0, 'convolution': 5.0,
               'add.7': 1.0}
  rows = profile.grouped(durations, ops)
  assert rows['convolutions'] == [105.0, 0.0, 2]
  assert rows['normalisation'] == [30.0, 30.0, 1]  # under transpose(...): backward
  assert rows['optimiser'] == [1.0, 0.0, 1] and rows['pooling'] == [0.0, 0.0, 0]


@pytest.mark.slow
def test_the_tiny_steps_profile_covers_its_convolutions_and_norms():
  import jax  # pylint: disable=g-import-not-at-top
  from cgc_jax.model import train_state  # pylint: disable=g-import-not-at-top
  from cgc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from cgc_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top
  from cgc_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  mesh = distributed.mesh()
  tx, _ = train_state.make_optimizer(config.train)
  state = train_state.create_state(config, mesh, 4, tx)
  batch = input_pipeline.synthetic_batch(config.train, 4, np.random.default_rng(0))
  batch = distributed.global_batch(batch, distributed.data_sharding(mesh))
  step = step_lib.make_train_step(config, mesh, tx)
  state, groups = profile.profile_train(step, state, batch, 2)
  jax.block_until_ready(state)
  assert set(groups) == set(profile.GROUPS)
  for g in ('convolutions', 'normalisation', 'optimiser', 'losses and CGC'):
    assert groups[g][0] > 0 and groups[g][2] > 0, g
  for total, backward, _ in groups.values():
    assert 0 <= backward <= total
