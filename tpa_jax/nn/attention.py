"""Multi-head self-attention with Shaw relative keys, Transformer-XL relative positions, or none."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from tpa_jax import sharding
from tpa_jax.errors import ConfigError
from tpa_jax.nn.chunked_attention import chunked_attention
from tpa_jax.nn.layers import Dense, LayerNorm, adapted
from tpa_jax.nn.pallas_attention import pallas_attention

POSITION_SCHEMES = ('relative_key', 'rel_pos', 'none')
# 'xla': scores materialised [B, H, T, T] (the reference); 'chunked': blockwise online softmax
# (tpa_jax/nn/chunked_attention.py); 'cudnn': cuDNN's fused attention with the positional term as
# a bias (NVIDIA GPUs, bf16/f16); 'pallas': the chunked algorithm as Pallas kernels
# (tpa_jax/nn/pallas_attention.py: Mosaic on a TPU, interpreted on CPU, chunked on a GPU);
# 'auto': 'xla' on CPU, 'chunked' on accelerators.
ATTENTION_IMPLS = ('xla', 'chunked', 'cudnn', 'pallas', 'auto')
_CUDNN_LENGTH_MULTIPLE = 64  # cuDNN's fused kernels want the sequence padded to a multiple of 64
_MASKED = -1e30  # scores are float32, so this stays finite and exp() underflows to exactly 0


def sinusoid_table(positions: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embeddings [len(positions), dim]: sin on even channels, cos on odd ones."""
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return table.reshape(positions.shape[0], -1)[:, :dim]


def relative_shift(x_bhtp: jax.Array) -> jax.Array:
  """y[..., i, j] = x[..., i, (t-1) - i + j] for x over 2t-1 relative positions, [.., t, 2t-1] ->
  [.., t, t].

  Reshapes and slices only (the Transformer-XL shift): a gather here would turn into a scatter
  in the gradient, which is slow on CPU and GPU. In the flattened rows, entry (i, (t-1) - i + j)
  sits at (t-1) + i·(2t-2) + j.
  """
  *lead, t, p = x_bhtp.shape
  if p != 2 * t - 1:
    raise ValueError(f'relative_shift needs 2t-1 = {2 * t - 1} positions, got {p}')
  if t == 1:
    return x_bhtp
  flat = x_bhtp.reshape(*lead, t * p)[..., t - 1:t - 1 + t * (2 * t - 2)]
  return flat.reshape(*lead, t, 2 * t - 2)[..., :t]


def _clip_distances(x_btr: jax.Array, t: int, left: int, right: int) -> jax.Array:
  """A table over distances -left..right spread over distances -(t-1)..t-1 (entry p is distance
  p - (t-1), the order `relative_shift` reads for distances j - i), each distance clipped to
  [-left, right]: slices and broadcasts only, so the gradient has no scatter."""
  lo, hi = -(t - 1), t - 1
  parts = []
  if lo < -left:  # distances below -left read its row
    parts.append(jnp.broadcast_to(x_btr[..., :1], x_btr.shape[:-1] + (-left - lo,)))
  a, b = max(lo, -left), min(hi, right)
  parts.append(x_btr[..., a + left:b + left + 1])
  if hi > right:  # distances above `right` read its row
    parts.append(jnp.broadcast_to(x_btr[..., -1:], x_btr.shape[:-1] + (hi - right,)))
  return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def cudnn_unsupported(*, dtype, head_dim: int, t) -> str | None:
  """Why cuDNN's fused attention cannot run at this dtype, head dim and length t, or None."""
  if jax.default_backend() != 'gpu':
    return f'needs an NVIDIA GPU (the backend is {jax.default_backend()})'
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f'needs bfloat16 or float16 compute (model.dtype is {jnp.dtype(dtype).name})'
  if head_dim > 128 or head_dim % 8:
    return f'needs a head dim that is a multiple of 8 up to 128 (it is {head_dim})'
  if not isinstance(t, int):
    return 'needs a concrete length (a symbolic one comes from jax.export)'
  return None


def pallas_unsupported() -> str | None:
  """Why the Pallas kernels cannot run on this backend, or None (interpreted on CPU)."""
  if jax.default_backend() == 'gpu':
    return ('has no Triton lowering (its per-row rotations are TPU operations, and its table '
            'gradient needs the grid to run in order)')
  return None


def resolve_impl(impl: str, *, dtype, head_dim: int, t) -> str:
  """The attention implementation that runs: 'auto' is 'xla' on CPU and 'chunked' elsewhere;
  'cudnn' or 'pallas' where unsupported run 'auto''s choice, and the blockwise ones at a symbolic
  length (jax.export) 'xla', each with a logged reason."""
  auto = 'xla' if jax.default_backend() == 'cpu' else 'chunked'
  if impl == 'auto':
    impl = auto
  if impl == 'cudnn' and (reason := cudnn_unsupported(dtype=dtype, head_dim=head_dim, t=t)):
    logging.log_first_n(logging.WARNING, 'attention_impl=cudnn %s: running %s', 1, reason, auto)
    impl = auto
  if impl == 'pallas' and (reason := pallas_unsupported()):
    logging.log_first_n(logging.WARNING, 'attention_impl=pallas %s: running %s', 1, reason, auto)
    impl = auto
  if impl == 'pallas' and jax.default_backend() == 'cpu':
    logging.log_first_n(logging.WARNING, 'attention_impl=pallas on CPU: the kernels run in '
                        'interpret mode (exact, slow: for tests)', 1)
  if impl in ('chunked', 'pallas') and not isinstance(t, int):
    logging.log_first_n(logging.WARNING, 'attention_impl=%s needs a concrete length; a symbolic '
                        'length (jax.export) runs the xla attention', 1, impl)
    impl = 'xla'
  return impl


class SelfAttention(nnx.Module):
  """Pre-norm multi-head self-attention over padded sequences (the conformer MHSA module).

  position='relative_key': scores = (q·k + q·E[clip(j-i, -left, right)]) / sqrt(d_head), one table E
    shared by all heads (Shaw et al. 2018, as in w2v-BERT 2.0).
  position='rel_pos': Transformer-XL scores ((q+u)·k + (q+v)·W_p·p(i-j)) / sqrt(d_head) with
    sinusoidal relative positions (as in ESPnet and NeMo conformers).
  """

  def __init__(self, dim: int, num_heads: int, *, position: str = 'relative_key',
               left_max_position: int = 64, right_max_position: int = 8, use_bias: bool = True,
               impl: str = 'xla', block: int = 128, eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if position not in POSITION_SCHEMES:
      raise ConfigError(f'model.position={position!r}: accepted values are {POSITION_SCHEMES}')
    if impl not in ATTENTION_IMPLS:
      raise ConfigError(f'model.attention_impl={impl!r}: accepted values are {ATTENTION_IMPLS}')
    if block < 1:
      raise ConfigError(f'model.attention_block={block}: must be a positive number of frames')
    if dim % num_heads:
      raise ConfigError(f'model.dim={dim} is not divisible by model.num_heads={num_heads}')
    head_dim = dim // num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.position, self.dtype, self.dim, self.head_dim = position, dtype, dim, head_dim
    self.left_max, self.right_max = left_max_position, right_max_position
    self.impl, self.block = impl, block
    self.norm = LayerNorm(dim, eps=eps, **kw)
    qkv_axes = ('embed', 'heads', 'kv')
    self.query = Dense(dim, (num_heads, head_dim), axes=qkv_axes, use_bias=use_bias, **kw)
    self.key = Dense(dim, (num_heads, head_dim), axes=qkv_axes, use_bias=use_bias, **kw)
    self.value = Dense(dim, (num_heads, head_dim), axes=qkv_axes, use_bias=use_bias, **kw)
    self.out = Dense((num_heads, head_dim), dim, axes=('heads', 'kv', 'embed'), use_bias=use_bias,
                     **kw)
    if position == 'relative_key':
      num = left_max_position + right_max_position + 1
      self.distance_table = nnx.Param(
          nnx.initializers.normal(1.0)(rngs.params(), (num, head_dim), param_dtype),
          out_sharding=(None, 'kv'))
    elif position == 'rel_pos':
      self.pos_proj = Dense(dim, (num_heads, head_dim), axes=qkv_axes, use_bias=False, **kw)
      bias_init = nnx.initializers.zeros_init()
      self.pos_bias_u = nnx.Param(bias_init(rngs.params(), (num_heads, head_dim), param_dtype),
                                  out_sharding=('heads', 'kv'))
      self.pos_bias_v = nnx.Param(bias_init(rngs.params(), (num_heads, head_dim), param_dtype),
                                  out_sharding=('heads', 'kv'))

  def _position_scores(self, q_bthk: jax.Array, t: int) -> jax.Array | None:
    """The positional term of the scores, [B, H, T, T], before the 1/sqrt(d_head) scaling."""
    # A symbolic length (jax.export) has no concrete clipping or shift: it gathers instead.
    concrete = isinstance(t, int)
    if self.position == 'relative_key':
      table_rk = self.distance_table[...].astype(self.dtype)
      qe_bhtp = jnp.einsum('bthk,rk->bhtr', q_bthk, table_rk,
                           preferred_element_type=jnp.float32)
      if concrete:
        # Row r of the table is distance r - left; spread it over every distance -(t-1)..t-1.
        qe_bhtp = _clip_distances(qe_bhtp, t, self.left_max, self.right_max)
      column = lambda d: jnp.clip(d, -self.left_max, self.right_max) + self.left_max  # noqa: E731
    elif self.position == 'rel_pos':
      # Relative distances i - j from t-1 down to -(t-1); entry p holds distance (t-1) - p.
      positions = jnp.arange(t - 1, -t, -1)
      pos_pd = sinusoid_table(positions, self.dim).astype(self.dtype)
      pos_phk = self.pos_proj(pos_pd)
      q_v = q_bthk + self.pos_bias_v[...].astype(self.dtype)
      qe_bhtp = jnp.einsum('bthk,phk->bhtp', q_v, pos_phk,
                           preferred_element_type=jnp.float32)
      column = lambda d: (t - 1) + d  # noqa: E731
    else:
      return None
    if concrete:
      return relative_shift(qe_bhtp)
    # The gather: query i reads the column of distance j - i for every key j.
    d_tt = jnp.arange(t)[None, :] - jnp.arange(t)[:, None]
    return jnp.take_along_axis(qe_bhtp, column(d_tt)[None, None], axis=-1)

  def _position_table(self, t: int) -> jax.Array | None:
    """The positional keys per distance j - i over -(t-1)..t-1, [2t-1, H, K] (the chunked
    implementation's table; row m is distance m - (t-1))."""
    h = self.query.kernel.shape[1]
    if self.position == 'relative_key':
      table_kr = self.distance_table[...].astype(self.dtype).T
      table_pk = _clip_distances(table_kr, t, self.left_max, self.right_max).T
      return jnp.broadcast_to(table_pk[:, None, :], (2 * t - 1, h, self.head_dim))
    if self.position == 'rel_pos':
      # Row m holds distance i - j = (t-1) - m, i.e. j - i = m - (t-1).
      pos_pd = sinusoid_table(jnp.arange(t - 1, -t, -1), self.dim).astype(self.dtype)
      return self.pos_proj(pos_pd)
    return None

  def resolved_impl(self, t) -> str:
    """The implementation that runs at length t (see `resolve_impl`)."""
    return resolve_impl(self.impl, dtype=self.dtype, head_dim=self.head_dim, t=t)

  def _cudnn(self, q_content, q_bthk, k_bthk, v_bthk, mask_bt):
    """cuDNN fused attention, the positional term a bias in the compute dtype; T padded to a
    multiple of 64 and the keys limited by each example's length (padding is at the end)."""
    t = q_bthk.shape[1]
    tp = -(-t // _CUDNN_LENGTH_MULTIPLE) * _CUDNN_LENGTH_MULTIPLE
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))  # noqa: E731
    scale = 1.0 / math.sqrt(self.head_dim)
    pos_bhts = self._position_scores(pad(q_bthk), tp)
    bias = None if pos_bhts is None else (pos_bhts * scale).astype(self.dtype)
    lengths_b = mask_bt.astype(jnp.int32).sum(-1)
    ctx = jax.nn.dot_product_attention(pad(q_content), pad(k_bthk), pad(v_bthk), bias=bias,
                                       scale=scale, key_value_seq_lengths=lengths_b,
                                       implementation='cudnn')
    return ctx[:, :t]

  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array, lora=None) -> jax.Array:
    """`lora`: the block's LoRA updates (tpa_jax/nn/lora.py), added to their projections."""
    h_btd = self.norm(x_btd)
    q_bthk, k_bthk, v_bthk = (adapted(self.query, h_btd, lora, 'q'),
                              adapted(self.key, h_btd, lora, 'k'),
                              adapted(self.value, h_btd, lora, 'v'))
    q_bthk, k_bthk, v_bthk = (sharding.constrain(a, ('batch', 'time', 'heads', 'kv'))
                              for a in (q_bthk, k_bthk, v_bthk))
    q_content = q_bthk
    if self.position == 'rel_pos':
      q_content = q_bthk + self.pos_bias_u[...].astype(self.dtype)
    impl = self.resolved_impl(x_btd.shape[1])
    if impl == 'cudnn':
      return adapted(self.out, self._cudnn(q_content, q_bthk, k_bthk, v_bthk, mask_bt), lora, 'out')
    if impl in ('chunked', 'pallas'):
      q_position = q_bthk
      if self.position == 'rel_pos':
        q_position = q_bthk + self.pos_bias_v[...].astype(self.dtype)
      blockwise = chunked_attention if impl == 'chunked' else functools.partial(
          pallas_attention, interpret=jax.default_backend() == 'cpu')
      ctx_bthk = blockwise(q_content, q_position, k_bthk, v_bthk, self._position_table, mask_bt,
                           block=self.block)
      return adapted(self.out, ctx_bthk, lora, 'out')
    # Scores accumulate in float32 (and the softmax statistics stay there) in bf16 compute.
    scores_bhts = jnp.einsum('bthk,bshk->bhts', q_content, k_bthk,
                             preferred_element_type=jnp.float32)
    pos_bhts = self._position_scores(q_bthk, x_btd.shape[1])
    if pos_bhts is not None:
      scores_bhts = scores_bhts + pos_bhts
    scores_bhts = scores_bhts / math.sqrt(self.head_dim)
    scores_bhts = jnp.where(mask_bt[:, None, None, :], scores_bhts, _MASKED)
    probs_bhts = jax.nn.softmax(scores_bhts, axis=-1).astype(self.dtype)
    ctx_bthk = jnp.einsum('bhts,bshk->bthk', probs_bhts, v_bthk)
    return adapted(self.out, ctx_bthk, lora, 'out')
