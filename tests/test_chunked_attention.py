"""The blockwise attentions (chunked, and the same algorithm as Pallas kernels, interpreted on
CPU) equal the reference (xla) attention, in values and gradients, without the [B, H, T, T]
scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ctc_batch, tiny_config
from flax import nnx
from test_train_step import host, make_trainer, update_difference

from tpa_jax.errors import ConfigError
from jax.experimental import pallas as pl
from tpa_jax.nn.attention import SelfAttention, cudnn_unsupported, pallas_unsupported
from tpa_jax.nn.chunked_attention import block_shift
from tpa_jax.nn.pallas_attention import pallas_attention, shift_rows, unshift_rows


def make_attention(position, impl='xla', block=32, dtype=jnp.float32):
  with nnx.use_eager_sharding(False):
    attn = SelfAttention(16, 2, position=position, left_max_position=5, right_max_position=2,
                         impl=impl, block=block, dtype=dtype, rngs=nnx.Rngs(0))
  if position == 'rel_pos':  # non-zero u/v so that both bias terms and their gradients count
    attn.pos_bias_u[...] = jax.random.normal(jax.random.key(1), attn.pos_bias_u.shape)
    attn.pos_bias_v[...] = jax.random.normal(jax.random.key(2), attn.pos_bias_v.shape)
  return attn


def batch(t, dim=16):
  """Two examples: one of length t and one of about half, so padding and its mask matter."""
  x_btd = jax.random.normal(jax.random.key(3), (2, t, dim))
  lengths = jnp.array([t, max(1, t // 2)])
  return x_btd, jnp.arange(t)[None] < lengths[:, None]


def value_and_grads(attn, impl, x_btd, mask_bt):
  """Outputs and the gradients w.r.t. every attention weight and the input (hence q, k, v) of a
  loss that weighs every valid output differently."""
  attn.impl = impl
  graphdef, state = nnx.split(attn)

  def loss(state, x):
    y = nnx.merge(graphdef, state)(x, mask_bt)
    w = jnp.sin(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
    return (y.astype(jnp.float32) * w * mask_bt[..., None]).sum(), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x_btd)
  return y, grads


def relative_error(a_tree, b_tree):
  """Whole-tree norm of the difference over the norm of the reference: a weight whose exact
  gradient is 0 (an attention key bias) has only rounding noise, so no per-leaf ratio."""
  a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
          for t in (a_tree, b_tree))
  return np.linalg.norm(a - b) / np.linalg.norm(a)


@pytest.mark.parametrize('impl', ['chunked', 'pallas'])
@pytest.mark.parametrize('position', ['relative_key', 'rel_pos', 'none'])
@pytest.mark.parametrize('t', [1, 7, 129, 300])
def test_blockwise_equals_xla_in_values_and_gradients(impl, position, t):
  attn = make_attention(position, block=32)  # 129 and 300 are not multiples of the block
  x_btd, mask_bt = batch(t)
  y_ref, g_ref = value_and_grads(attn, 'xla', x_btd, mask_bt)
  y, g = value_and_grads(attn, impl, x_btd, mask_bt)
  valid = np.asarray(mask_bt)[..., None]
  assert relative_error(y_ref * valid, y * valid) <= 1e-5
  assert relative_error(g_ref, g) <= 1e-5
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g)):
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_ref))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('impl', ['chunked', 'pallas'])
@pytest.mark.parametrize('position', ['relative_key', 'rel_pos'])
def test_blockwise_in_bfloat16_stays_close_to_xla(impl, position):
  """bf16 compute: both round q, k, v and the probabilities to bf16, in different orders, so
  they agree to bf16 precision (stated tolerance: 2% of the norm), not bit for bit."""
  attn = make_attention(position, block=32, dtype=jnp.bfloat16)
  x_btd, mask_bt = batch(100)
  y_ref, g_ref = value_and_grads(attn, 'xla', x_btd, mask_bt)
  y, g = value_and_grads(attn, impl, x_btd, mask_bt)
  valid = np.asarray(mask_bt)[..., None]
  assert relative_error(y_ref * valid, y * valid) <= 2e-2
  assert relative_error(g_ref, g) <= 2e-2


@pytest.mark.parametrize('impl', ['chunked', 'pallas'])
def test_padded_frames_do_not_change_valid_outputs(impl):
  attn = make_attention('rel_pos', impl=impl, block=16)
  x_btd, mask_bt = batch(50)
  noise = jax.random.normal(jax.random.key(9), x_btd.shape) * (~mask_bt)[..., None]
  valid = np.asarray(mask_bt)[..., None]
  np.testing.assert_array_equal(np.asarray(attn(x_btd, mask_bt)) * valid,
                                np.asarray(attn(x_btd + 100 * noise, mask_bt)) * valid)


def test_block_shift_reads_each_distance():
  bq, bk = 3, 5
  x = np.arange(bq * (bq + bk - 1)).reshape(bq, bq + bk - 1)
  want = np.array([[x[a, (bq - 1) - a + c] for c in range(bk)] for a in range(bq)])
  np.testing.assert_array_equal(np.asarray(block_shift(jnp.asarray(x), bk)), want)


def test_chunked_gradient_holds_no_time_by_time_buffer():
  """At a length where B·H·T·T scores would be the largest buffer, the compiled gradient of the
  chunked attention needs less temporary memory than one such array; xla's needs more. (The
  Pallas kernels hold one [bq, bk] block by construction; interpreted, their memory is the
  interpreter's.)"""
  t = 1024
  x_btd, mask_bt = batch(t)
  scores_bytes = 2 * 2 * t * t * 4  # B=2, H=2, float32
  temp = {}
  for impl in ('xla', 'chunked'):
    attn = make_attention('rel_pos', impl=impl, block=32)
    graphdef, state = nnx.split(attn)
    grad = jax.jit(jax.grad(lambda s, x: nnx.merge(graphdef, s)(x, mask_bt).sum(), (0, 1)))
    temp[impl] = grad.lower(state, x_btd).compile().memory_analysis().temp_size_in_bytes
  assert temp['xla'] > scores_bytes, temp
  assert temp['chunked'] < scores_bytes, temp


@pytest.mark.parametrize('impl', ['chunked', 'pallas'])
def test_a_tpa_step_with_blockwise_attention_equals_xla(mesh1, impl):
  results = {}
  for impl in ('xla', impl):
    # 16 frames after subsampling in blocks of 6: padded to 18 inside the chunked attention
    # (the Pallas kernels round the block up to 8 and pad to 24).
    config = tiny_config('tpa', **{'model.attention_impl': impl, 'model.attention_block': 6,
                                   'model.position': 'rel_pos'})
    trainer = make_trainer(config, mesh1, frozen_dtype=None, eps=1e-4)
    before = host(trainer.state.trainable)
    metrics = jax.tree.map(float, trainer.step(ctc_batch(tiny_config())))
    results[impl] = metrics['loss'], host(trainer.state.trainable)
  (loss_ref, params_ref), (loss, params) = results['xla'], results[impl]
  assert abs(loss - loss_ref) <= 1e-5 * loss_ref
  rel, worst, moved = update_difference(before, params_ref, params)
  assert moved and rel <= 1e-4, (rel, worst)


def test_auto_is_xla_on_cpu_and_unknown_implementations_are_named():
  assert make_attention('rel_pos', impl='auto').resolved_impl(10) == 'xla'
  with pytest.raises(ConfigError,
                     match=r"attention_impl='flash'.*'xla', 'chunked', 'cudnn', 'pallas', 'auto'"):
    make_attention('rel_pos', impl='flash')
  with pytest.raises(ConfigError, match='attention_block=0'):
    make_attention('rel_pos', block=0)


def test_cudnn_where_unsupported_runs_the_auto_choice_and_says_why():
  """On CPU cuDNN's attention cannot run: the module runs 'auto''s choice (xla) and names the
  reason, never computing something else silently."""
  attn = make_attention('rel_pos', impl='cudnn')
  assert attn.resolved_impl(10) == 'xla'
  assert 'needs an NVIDIA GPU (the backend is cpu)' in cudnn_unsupported(dtype=jnp.bfloat16, head_dim=8, t=10)
  x_btd, mask_bt = batch(20)
  got = attn(x_btd, mask_bt)
  attn.impl = 'xla'
  np.testing.assert_array_equal(np.asarray(got), np.asarray(attn(x_btd, mask_bt)))


def test_pallas_on_cpu_is_interpreted_not_replaced():
  assert make_attention('rel_pos', impl='pallas').resolved_impl(10) == 'pallas'
  assert pallas_unsupported() is None  # CPU: interpret mode; a GPU names why and runs chunked


def in_kernel(fn, x, out_shape):
  """fn applied inside an interpreted Pallas kernel (pltpu.roll has no rule outside one)."""
  def kernel(x_ref, o_ref):
    o_ref[...] = fn(x_ref[...])
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(out_shape, x.dtype),
                        interpret=True)(x)


def test_kernel_rotations_are_the_block_shift_and_its_transpose():
  bq, bk = 3, 5
  x = jnp.arange(bq * (bq + bk), dtype=jnp.float32).reshape(bq, bq + bk)
  shifted = in_kernel(lambda a: shift_rows(a, bk), x, (bq, bk))
  np.testing.assert_array_equal(shifted, block_shift(x[:, :bq + bk - 1], bk))
  y = jax.random.normal(jax.random.key(0), (bq, bk))
  unshifted = in_kernel(lambda a: unshift_rows(a, bq), y, (bq, bq + bk))
  # <shift(x), y> = <x, unshift(y)> for every x: the backward rotation is the transpose.
  basis = jnp.eye(bq * (bq + bk)).reshape(-1, bq, bq + bk)
  want = jnp.stack([(in_kernel(lambda a: shift_rows(a, bk), e, (bq, bk)) * y).sum()
                    for e in basis]).reshape(bq, bq + bk)
  np.testing.assert_allclose(unshifted, want, rtol=1e-6)


def test_pallas_kernels_lower_for_a_tpu():
  """The forward and both backward kernels lower to Mosaic at the 600m preset's shapes in bf16
  (the TPU compiler itself runs only on a TPU)."""
  b, t, h, k = 1, 1500, 2, 64

  def loss(qc, qp, k_, v, table, mask):
    table_fn = lambda tp: table[2048 - tp:2048 + tp - 1]  # noqa: E731
    return pallas_attention(qc, qp, k_, v, table_fn, mask).astype(jnp.float32).sum()

  shapes = [jax.ShapeDtypeStruct((b, t, h, k), jnp.bfloat16)] * 4 + [
      jax.ShapeDtypeStruct((4095, h, k), jnp.bfloat16), jax.ShapeDtypeStruct((b, t), jnp.bool_)]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))),
                               platforms=['tpu'])(*shapes)
  assert exported.mlir_module().count('tpu_custom_call') == 3  # forward, keys, queries
