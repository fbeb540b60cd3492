"""Adapters: identity at init for every placement, block selections, bad adapter configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ctc_batch, tiny_config
from flax import nnx

from tpa_jax.config import selection
from tpa_jax.nn import adapters
from tpa_jax.nn import build
from tpa_jax.nn.params import AdapterParam

PLACEMENTS = tuple(adapters.PLACEMENTS)


def _outputs(model, batch):
  return model(jnp.asarray(batch['features']), jnp.asarray(batch['feature_mask']))[0]


@pytest.mark.parametrize('placement,blocks', [(p, '1:3') for p in PLACEMENTS] +
                         [('ff_parallel', 'all'), ('ff_parallel', '0,3')])
def test_identity_at_init(placement, blocks, mesh1):
  """An adapted model equals its base exactly at step 0 (op by op, so no fusion reorders math)."""
  base = build.create_model(tiny_config('full'), mesh1)
  adapted = build.create_model(tiny_config('tpa', **{'adapter.placement': placement,
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
  base = build.create_model(tiny_config('full'), mesh1)
  adapted = build.create_model(config, mesh1)
  batch = ctc_batch(config, num_frames=48)
  with jax.disable_jit():
    diff = jnp.abs(_outputs(adapted, batch) - _outputs(base, batch)).max()
  assert diff > 1e-4


def test_adapter_weights_are_stacked_only_for_selected_blocks(mesh1):
  model = build.create_model(tiny_config('tpa', **{'adapter.blocks': '2:4',
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
  assert selection.parse_blocks(text, 8) == want


@pytest.mark.parametrize('bad', ['12:24', '9', [8], [-9], '3:1', 'lower', [1, 1], [], '0:8:0',
                                 '1,9', '[]'])
def test_block_selection_outside_model_is_rejected(bad):
  with pytest.raises(ValueError, match='adapter.blocks'):
    selection.parse_blocks(bad, 8)


def test_bad_adapter_configs_name_the_field(mesh1):
  with pytest.raises(ValueError, match=r"adapter.placement='ffn_parallel'.*ff_parallel"):
    build.create_model(tiny_config('tpa', **{'adapter.placement': 'ffn_parallel'}), mesh1)
  with pytest.raises(ValueError, match=r'adapter.blocks=.*outside a model of 4 blocks'):
    build.create_model(tiny_config('tpa', **{'adapter.blocks': '2:6'}), mesh1)
  for bottleneck in (0, -3):
    with pytest.raises(ValueError, match=f'adapter.bottleneck={bottleneck}'):
      build.create_model(tiny_config('tpa', **{'adapter.bottleneck': bottleneck}), mesh1)
  with pytest.raises(ValueError, match='adapter.activation'):
    build.create_model(tiny_config('tpa', **{'adapter.activation': 'tanh'}), mesh1)


# -- each placement against a NumPy reference of its formula ------------------------------------

def _layer(stacked: nnx.Module, i: int) -> nnx.Module:
  """Layer `i` of a module stacked on a leading `layers` axis."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(lambda w: w[i], state))


def _adapter_np(adapter, residual_weight: float, x: np.ndarray) -> np.ndarray:
  """residual_weight · (W_up · relu(W_down · LN(x) + b_down) + b_up), in NumPy (float64)."""
  w = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  h = (x - mean) / np.sqrt(var + 1e-5) * w(adapter.norm.scale) + w(adapter.norm.bias)
  h = np.maximum(h @ w(adapter.down.kernel) + w(adapter.down.bias), 0.0)
  return residual_weight * (h @ w(adapter.up.kernel) + w(adapter.up.bias))


def _randomize_adapters(model, seed: int = 0) -> None:
  """Every adapter weight drawn at a scale where its contribution is far above rounding."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, AdapterParam)
  nnx.update(model, jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state))


def _reference_block(block, adapters, placement: str, x: np.ndarray,
                     mask: np.ndarray) -> np.ndarray:
  """The conformer block of DESIGN with `placement`'s adapters, composed in NumPy from the
  block's own sub-modules (FFNs, MHSA, conv, final LN) and a NumPy adapter."""
  f = lambda module, *args: np.asarray(module(*(jnp.asarray(a, jnp.float32) for a in args)),
                                       np.float64)  # noqa: E731
  a = lambda slot, v: _adapter_np(adapters.slots[slot], adapters.residual_weight, v)  # noqa: E731
  m = jnp.asarray(mask)

  def ffn(module, slot, h):
    if placement == 'ff_parallel':
      return h + 0.5 * (f(module, h) + a(slot, h))
    if placement == 'ff_sequential':
      y = f(module, h)
      return h + 0.5 * (y + a(slot, y))
    return h + 0.5 * f(module, h)

  h = ffn(block.ffn1, 'ffn1', x)
  y = np.asarray(block.attention(jnp.asarray(h, jnp.float32), m), np.float64)
  h = h + y + (a('mhsa', h) if placement == 'mhsa_parallel' else 0.0)
  y = np.asarray(block.conv(jnp.asarray(h, jnp.float32), m), np.float64)
  h = h + y + (a('conv', h) if placement == 'conv_parallel' else 0.0)
  h = ffn(block.ffn2, 'ffn2', h)
  h = f(block.final_norm, h)
  if placement == 'block_parallel':
    h = h + a('block', x)
  elif placement == 'block_sequential':
    h = h + a('block', h)
  return h


@pytest.mark.parametrize('placement', PLACEMENTS)
def test_adapted_block_follows_its_formula(placement, mesh1):
  """One adapted block against the formula of its placement (TPA: x + ½(FFN(x) + A(x)) at both
  FFNs), with non-zero adapter weights and a residual weight of 0.7: dropping the ½, feeding an
  adapter the FFN's output instead of its input, or ignoring the residual weight fails."""
  config = tiny_config('tpa', **{'adapter.placement': placement, 'adapter.residual_weight': 0.7})
  model = build.create_model(config, mesh1)
  _randomize_adapters(model)
  block, adapters = _layer(model.encoder.blocks, 1), _layer(model.encoder.adapters, 1)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 12, 32))
  mask = np.arange(12)[None, :] < np.array([[12], [9]])
  with jax.disable_jit():
    got = np.asarray(block(jnp.asarray(x, jnp.float32), jnp.asarray(mask), adapters), np.float64)
    want = _reference_block(block, adapters, placement, x, mask)
    plain = np.asarray(block(jnp.asarray(x, jnp.float32), jnp.asarray(mask), None), np.float64)
  assert np.abs(want - plain).max() > 0.05  # the adapters contribute well above the tolerance
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_non_contiguous_block_selection_adapts_exactly_those_blocks(mesh1):
  """Adapters on blocks 0 and 3 of 4: the encoder equals a reference that runs the blocks one
  by one and applies the adapters of exactly blocks 0 and 3."""
  config = tiny_config('tpa', **{'adapter.blocks': '0,3'})
  model = build.create_model(config, mesh1)
  _randomize_adapters(model)
  assert model.encoder.adapter_blocks == (0, 3)
  batch = ctc_batch(config, num_frames=48)
  features, mask = jnp.asarray(batch['features']), jnp.asarray(batch['feature_mask'])
  with jax.set_mesh(mesh1):
    got, _ = nnx.jit(lambda m, f, k: m.encode(f, k))(model, features, mask)
  x, out_mask = model.encoder.frontend(features, mask)
  for i in range(4):
    adapters = _layer(model.encoder.adapters, (0, 3).index(i)) if i in (0, 3) else None
    x = _layer(model.encoder.blocks, i)(x, out_mask, adapters)
  np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)
  plain = build.create_model(tiny_config('full'), mesh1)
  with jax.set_mesh(mesh1):
    base, _ = nnx.jit(lambda m, f, k: m.encode(f, k))(plain, features, mask)
  assert np.abs(np.asarray(base) - np.asarray(got)).max() > 0.05
