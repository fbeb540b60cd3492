"""Adapters: identity at init for every placement, block selections, bad adapter configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ctc_batch, tiny_config
from flax import nnx

from tpa_jax import models
from tpa_jax.nn import adapters
from tpa_jax.nn.params import AdapterParam

PLACEMENTS = tuple(adapters.PLACEMENTS)


def _outputs(model, batch):
  return model(jnp.asarray(batch['features']), jnp.asarray(batch['feature_mask']))[0]


@pytest.mark.parametrize('placement,blocks', [(p, '1:3') for p in PLACEMENTS] +
                         [('ff_parallel', 'all'), ('ff_parallel', '0,3')])
def test_identity_at_init(placement, blocks, mesh1):
  """An adapted model equals its base exactly at step 0 (op by op, so no fusion reorders math)."""
  base = models.create_model(tiny_config('full'), mesh1)
  adapted = models.create_model(tiny_config('tpa', **{'adapter.placement': placement,
                                                      'adapter.blocks': blocks}), mesh1)
  assert jax.tree.leaves(nnx.state(adapted, AdapterParam)), 'no adapter weights were created'
  batch = ctc_batch(tiny_config(), num_frames=48)
  with jax.disable_jit():
    want, got = _outputs(base, batch), _outputs(adapted, batch)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Compiled, XLA may fuse the extra zero-adds differently; the difference stays at rounding level.
  with jax.set_mesh(mesh1):
    got_jit = nnx.jit(_outputs)(adapted, batch)
  np.testing.assert_allclose(np.asarray(got_jit), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('placement', PLACEMENTS)
def test_adapters_change_output_once_trained(placement, mesh1):
  """The identity is not vacuous: a non-zero up projection changes the output."""
  config = tiny_config('tpa', **{'adapter.placement': placement, 'adapter.up_init': 'normal'})
  base = models.create_model(tiny_config('full'), mesh1)
  adapted = models.create_model(config, mesh1)
  batch = ctc_batch(config, num_frames=48)
  with jax.disable_jit():
    diff = jnp.abs(_outputs(adapted, batch) - _outputs(base, batch)).max()
  assert diff > 1e-4


def test_adapter_weights_are_stacked_only_for_selected_blocks(mesh1):
  model = models.create_model(tiny_config('tpa', **{'adapter.blocks': '2:4',
                                                    'adapter.bottleneck': 3}), mesh1)
  assert model.encoder.adapter_blocks == (2, 3)
  down = model.encoder.adapters.slots['ffn1'].down.kernel
  assert down.shape == (2, 32, 3)
  assert isinstance(down, AdapterParam)
  # The base layout does not depend on the adapters: blocks stay stacked for all 4 blocks.
  assert model.encoder.blocks.ffn1.up.kernel.shape[0] == 4


@pytest.mark.parametrize('text,want', [
    ('all', (0, 1, 2, 3, 4, 5, 6, 7)), ('4:8', (4, 5, 6, 7)), (':2', (0, 1)), ('-2:', (6, 7)),
    ('0:8:3', (0, 3, 6)), ('5', (5,)), ('0, 3,5', (0, 3, 5)), ('[6,-8]', (0, 6)),
    ([7, 1, -8], (0, 1, 7)), (3, (3,)),
])
def test_parse_blocks(text, want):
  assert adapters.parse_blocks(text, 8) == want


@pytest.mark.parametrize('bad', ['12:24', '9', [8], [-9], '3:1', 'lower', [1, 1], [], '0:8:0',
                                 '1,9', '[]'])
def test_block_selection_outside_model_is_rejected(bad):
  with pytest.raises(ValueError, match='adapter.blocks'):
    adapters.parse_blocks(bad, 8)


def test_bad_adapter_configs_name_the_field(mesh1):
  with pytest.raises(ValueError, match=r"adapter.placement='ffn_parallel'.*ff_parallel"):
    models.create_model(tiny_config('tpa', **{'adapter.placement': 'ffn_parallel'}), mesh1)
  with pytest.raises(ValueError, match=r'adapter.blocks=.*outside a model of 4 blocks'):
    models.create_model(tiny_config('tpa', **{'adapter.blocks': '2:6'}), mesh1)
  for bottleneck in (0, -3):
    with pytest.raises(ValueError, match=f'adapter.bottleneck={bottleneck}'):
      models.create_model(tiny_config('tpa', **{'adapter.bottleneck': bottleneck}), mesh1)
  with pytest.raises(ValueError, match='adapter.activation'):
    models.create_model(tiny_config('tpa', **{'adapter.activation': 'tanh'}), mesh1)
