"""Conformer encoder: scan == unrolled, padding invariance, attention positions, input checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ctc_batch, tiny_config
from flax import nnx

from tpa_jax.nn import build
from tpa_jax.nn.attention import SelfAttention
from tpa_jax.train import partition


def _encode(model, features, mask):
  return nnx.jit(lambda m, f, k: m.encode(f, k))(model, jnp.asarray(features), jnp.asarray(mask))


@pytest.mark.parametrize('blocks', ['all', '1:3'])
def test_scanned_encoder_equals_unrolled_loop(blocks, mesh1):
  scanned = build.create_model(tiny_config('tpa', **{'adapter.blocks': blocks,
                                                      'adapter.up_init': 'normal'}), mesh1)
  unrolled = build.create_model(tiny_config('tpa', **{'adapter.blocks': blocks,
                                                       'adapter.up_init': 'normal',
                                                       'model.scan_layers': False}), mesh1)
  for a, b in zip(jax.tree.leaves(nnx.state(scanned)), jax.tree.leaves(nnx.state(unrolled))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same weights
  batch = ctc_batch(tiny_config())
  with jax.set_mesh(mesh1):
    (want, mask_a), (got, mask_b) = (_encode(m, batch['features'], batch['feature_mask'])
                                     for m in (scanned, unrolled))
  np.testing.assert_array_equal(np.asarray(mask_a), np.asarray(mask_b))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


VARIANTS = {
    'shaw_symmetric_conv2d': {},
    'xl_causal_stacked_batchnorm': {'model.position': 'rel_pos', 'model.conv_causal': True,
                                    'model.frontend.kind': 'stacked', 'model.conv_norm': 'batch',
                                    'model.conv_kernel_size': 4, 'model.final_norm': True},
    'nopos_symmetric_stacked_nobias': {'model.position': 'none', 'model.frontend.kind': 'stacked',
                                       'model.ffn_bias': False, 'model.conv_bias': False,
                                       'model.attention_bias': False},
    'shaw_causal_conv2d_partial_adapters': {'model.conv_causal': True, 'adapter.blocks': '2:4',
                                            'adapter.placement': 'block_sequential'},
}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_valid_frames_do_not_depend_on_padding(variant, mesh1):
  config = tiny_config('tpa', **{'adapter.up_init': 'normal', **VARIANTS[variant]})
  model = build.create_model(config, mesh1)
  rng = np.random.default_rng(1)
  length, short, long = 45, 48, 80
  utterance = rng.normal(size=(length, 80)).astype(np.float32)

  def padded(total):
    # Padding holds noise, not zeros: nothing on valid frames may read it.
    feats = rng.normal(size=(1, total, 80)).astype(np.float32) * 5
    feats[0, :length] = utterance
    return feats, np.arange(total)[None] < length

  with jax.set_mesh(mesh1):
    a, mask_a = _encode(model, *padded(short))
    b, mask_b = _encode(model, *padded(long))
  valid = int(np.asarray(mask_a).sum())
  assert valid > 0 and valid == int(np.asarray(mask_b).sum())
  assert not np.asarray(mask_b)[0, valid:].any()
  np.testing.assert_allclose(np.asarray(b)[0, :valid], np.asarray(a)[0, :valid],
                             rtol=1e-5, atol=1e-5)


def _reference_scores(q, k, position, attention):
  """Attention logits from the definitions, in NumPy, one (query, key) pair at a time."""
  t, h, d = q.shape
  out = np.zeros((h, t, t))
  for i in range(t):
    for j in range(t):
      for n in range(h):
        if position == 'relative_key':
          table = np.asarray(attention.distance_table[...])
          e = table[np.clip(j - i, -attention.left_max, attention.right_max) + attention.left_max]
          out[n, i, j] = (q[i, n] @ k[j, n] + q[i, n] @ e) / math.sqrt(d)
        else:  # Transformer-XL: ((q+u)·k + (q+v)·W_p p(i-j)) / sqrt(d)
          dim = h * d
          inv = 1.0 / 10000 ** (np.arange(0, dim, 2) / dim)
          p = np.stack([np.sin((i - j) * inv), np.cos((i - j) * inv)], -1).reshape(-1)[:dim]
          wp = np.asarray(attention.pos_proj.kernel[...])
          u, v = np.asarray(attention.pos_bias_u[...]), np.asarray(attention.pos_bias_v[...])
          r = np.einsum('d,dhk->hk', p, wp)[n]
          out[n, i, j] = ((q[i, n] + u[n]) @ k[j, n] + (q[i, n] + v[n]) @ r) / math.sqrt(d)
  return out


@pytest.mark.parametrize('position', ['relative_key', 'rel_pos'])
def test_attention_positions_match_their_definitions(position):
  with nnx.use_eager_sharding(False):
    attn = SelfAttention(8, 2, position=position, left_max_position=3, right_max_position=1,
                         rngs=nnx.Rngs(0))
  if position == 'rel_pos':  # non-zero u/v so both bias terms are exercised
    attn.pos_bias_u[...] = jnp.full((2, 4), 0.3)
    attn.pos_bias_v[...] = jnp.full((2, 4), -0.2)
  t = 7  # longer than left + right + 1, so clipping happens on both sides
  x = np.random.default_rng(0).normal(size=(1, t, 8)).astype(np.float32)
  h = attn.norm(jnp.asarray(x))
  q, k = np.asarray(attn.query(h))[0], np.asarray(attn.key(h))[0]
  scores = np.asarray(attn._position_scores(jnp.asarray(q)[None], t))[0]
  content = np.einsum('thk,shk->hts', q + (np.asarray(attn.pos_bias_u[...])
                                           if position == 'rel_pos' else 0), k)
  np.testing.assert_allclose((content + scores) / math.sqrt(4),
                             _reference_scores(q, k, position, attn), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('t', [1, 2, 5, 40])
def test_relative_shift_equals_the_gather_it_replaces(t):
  # Sequences shorter than the clipping window (t <= left) and longer than it on both sides.
  from tpa_jax.nn import attention as attention_lib
  rng = np.random.default_rng(t)
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  for left, right in ((3, 1), (0, 0), (8, 2)):
    x = rng.normal(size=(2, 3, t, left + right + 1)).astype(np.float32)
    index = np.broadcast_to(np.clip(j - i, -left, right) + left, (2, 3, t, t))
    got = attention_lib.relative_shift(attention_lib._clip_distances(jnp.asarray(x), t, left, right))
    np.testing.assert_array_equal(np.asarray(got), np.take_along_axis(x, index, -1))
  x = rng.normal(size=(2, 3, t, 2 * t - 1)).astype(np.float32)
  index = np.broadcast_to((t - 1) - i + j, (2, 3, t, t))
  np.testing.assert_array_equal(np.asarray(attention_lib.relative_shift(jnp.asarray(x))),
                                np.take_along_axis(x, index, -1))


def test_frozen_prefix_depth_follows_the_trainable_weights():
  cases = {('full', 'all'): None, ('tpa', 'all'): 0, ('tpa', '2:4'): 2, ('tpa', '1,3'): 1,
           ('head', 'all'): 4}
  for (method, blocks), depth in cases.items():
    config = tiny_config(method, **{'adapter.blocks': blocks})
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(lambda: build.build_model(config, seed=0))  # shapes only
    _, trainable, _, _ = partition.split(model, config.train.trainable)
    assert model.frozen_depth(trainable) == depth, (method, blocks)


def test_bad_inputs_name_the_argument(mesh1):
  model = build.create_model(tiny_config('tpa'), mesh1)
  feats, mask = jnp.zeros((2, 32, 80)), jnp.ones((2, 32), bool)
  with pytest.raises(ValueError, match=r'features must be \[batch, frames, 80\]'):
    model(feats[0], mask)
  with pytest.raises(TypeError, match='features must be a floating dtype'):
    model(feats.astype(jnp.int32), mask)
  with pytest.raises(ValueError, match='model.frontend.input_dim=80'):
    model(jnp.zeros((2, 32, 40)), mask)
  with pytest.raises(ValueError, match=r'feature_mask must be \[batch, frames\]'):
    model(feats, mask[:, :10])
  with pytest.raises(TypeError, match='feature_mask must be bool'):
    model(feats, mask.astype(jnp.float32))


@pytest.mark.parametrize('field,value,accepted', [
    ('model.position', 'alibi', 'relative_key'), ('model.conv_norm', 'group', 'layer'),
    ('model.remat_policy', 'some', 'dots'), ('model.frontend.kind', 'wav', 'conv2d'),
    ('model.dtype', 'float16', 'bfloat16'), ('head.kind', 'rnnt', 'ctc'),
])
def test_bad_model_configs_name_the_field(field, value, accepted, mesh1):
  with pytest.raises(ValueError, match=rf"{field}='{value}'.*{accepted}"):
    build.create_model(tiny_config('tpa', **{field: value}), mesh1)


def test_bfloat16_compute_tracks_float32(mesh1):
  batch = ctc_batch(tiny_config())
  outputs = {}
  for dtype in ('float32', 'bfloat16'):
    model = build.create_model(tiny_config('tpa', **{'model.dtype': dtype}), mesh1)
    with jax.set_mesh(mesh1):
      out, mask = _encode(model, batch['features'], batch['feature_mask'])
    outputs[dtype] = np.asarray(out.astype(jnp.float32))
  assert out.dtype == jnp.bfloat16
  mask = np.asarray(mask)
  a, b = outputs['float32'][mask], outputs['bfloat16'][mask]
  assert np.isfinite(b).all()
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05
