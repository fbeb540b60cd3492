"""Blockwise attention with relative positions: an online softmax over key blocks (a scan), the
positional term computed per block from the position table, never a [B, H, T, T] array.

The algorithm a fused kernel follows, in plain JAX so that it runs on every backend. The forward
pass keeps only the output and each query's log-sum-exp; the backward pass (`jax.custom_vjp`)
recomputes each key block's scores from them, as flash attention does.

Positions: `table_wk` holds one row per distance j - i over -(T-1)..T-1 (row m is distance
m - (T-1)), already projected and per head ([2T-1, H, K]). For query block [i0, i0+bq) and key
block [j0, j0+bk) the distances span bq + bk - 1 consecutive rows, starting at j0 - i0 - bq + T.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_MASKED = -1e30  # as in attention.py: finite in float32, exp() underflows to exactly 0


def block_shift(x_qw: jax.Array, bk: int) -> jax.Array:
  """y[..., a, c] = x[..., a, (bq-1) - a + c] for x over bq + bk - 1 local distances, [.., bq, W]
  -> [.., bq, bk]: the Transformer-XL shift of a rectangular block (reshapes and slices only)."""
  *lead, bq, w = x_qw.shape
  if w != bq + bk - 1:
    raise ValueError(f'block_shift needs bq + bk - 1 = {bq + bk - 1} distances, got {w}')
  if bq == 1:
    return x_qw
  # Entry (a, (bq-1) - a + c) sits at (bq-1) + a·(w-1) + c in the flattened rows.
  flat = x_qw.reshape(*lead, bq * w)[..., bq - 1:bq - 1 + bq * (w - 1)]
  return flat.reshape(*lead, bq, w - 1)[..., :bk]


def _pad_to(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _block_scores(qc_bnqhk, qp_bnqhk, k_bchk, table_wk, mask_bc, j0, *, t, scale):
  """Scaled, masked scores of every query against key block j0: [B, H, N, bq, bk] in float32."""
  b, n, bq, h, kd = qc_bnqhk.shape
  bk = k_bchk.shape[1]
  s = jnp.einsum('bnqhk,bchk->bhnqc', qc_bnqhk, k_bchk, preferred_element_type=jnp.float32)
  if table_wk is not None:
    w = bq + bk - 1
    starts_n = j0 - jnp.arange(n) * bq - bq + t
    rows_nwhk = jax.vmap(lambda s0: jax.lax.dynamic_slice_in_dim(table_wk, s0, w, axis=0))(starts_n)
    pos = jnp.einsum('bnqhk,nwhk->bhnqw', qp_bnqhk, rows_nwhk, preferred_element_type=jnp.float32)
    s = s + block_shift(pos, bk)
  s = s * scale
  return jnp.where(mask_bc[:, None, None, None, :], s, _MASKED)


def _split_queries(x_bthk, bq):
  b, t, h, k = x_bthk.shape
  return x_bthk.reshape(b, t // bq, bq, h, k)


def _key_blocks(x_bt_, bk):
  """[B, T, ...] -> [T/bk, B, bk, ...], the scan's leading axis."""
  b, t = x_bt_.shape[:2]
  return jnp.moveaxis(x_bt_.reshape(b, t // bk, bk, *x_bt_.shape[2:]), 1, 0)


def _forward(qc, qp, k, v, table, mask, bq, bk, scale):
  b, t, h, kd = qc.shape
  qc_n, qp_n = _split_queries(qc, bq), _split_queries(qp, bq)
  n = t // bq

  def step(carry, xs):
    m_i, l_i, acc = carry
    j0, k_j, v_j, mask_j = xs
    s = _block_scores(qc_n, qp_n, k_j, table, mask_j, j0, t=t, scale=scale)
    m_new = jnp.maximum(m_i, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m_i - m_new)
    l_new = l_i * corr + p.sum(-1)
    pv = jnp.einsum('bhnqc,bchk->bhnqk', p.astype(v.dtype), v_j,
                    preferred_element_type=jnp.float32)
    return (m_new, l_new, acc * corr[..., None] + pv), None

  init = (jnp.full((b, h, n, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, n, bq), jnp.float32),
          jnp.zeros((b, h, n, bq, kd), jnp.float32))
  xs = (jnp.arange(0, t, bk), _key_blocks(k, bk), _key_blocks(v, bk), _key_blocks(mask, bk))
  (m_i, l_i, acc), _ = jax.lax.scan(step, init, xs)
  out_bhnqk = acc / l_i[..., None]
  lse = m_i + jnp.log(l_i)
  out = jnp.moveaxis(out_bhnqk, 1, 3).reshape(b, t, h, kd)
  return out.astype(v.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(qc, qp, k, v, table, mask, bq, bk, scale):
  return _forward(qc, qp, k, v, table, mask, bq, bk, scale)[0]


def _attention_fwd(qc, qp, k, v, table, mask, bq, bk, scale):
  out, lse = _forward(qc, qp, k, v, table, mask, bq, bk, scale)
  return out, (qc, qp, k, v, table, mask, out, lse)


def _attention_bwd(bq, bk, scale, res, d_out):
  qc, qp, k, v, table, mask, out, lse = res
  b, t, h, kd = qc.shape
  qc_n, qp_n = _split_queries(qc, bq), _split_queries(qp, bq)
  do_bhnqk = jnp.moveaxis(_split_queries(d_out, bq), 3, 1).astype(jnp.float32)
  o_bhnqk = jnp.moveaxis(_split_queries(out, bq), 3, 1).astype(jnp.float32)
  delta = (do_bhnqk * o_bhnqk).sum(-1)  # rowsum(dO ∘ O) = Σ_c P·dP

  def step(carry, xs):
    dqc, dqp, dtable = carry
    j0, k_j, v_j, mask_j = xs
    scores = functools.partial(_block_scores, mask_bc=mask_j, j0=j0, t=t, scale=scale)
    s, vjp = jax.vjp(scores, qc_n, qp_n, k_j, table)
    p = jnp.exp(s - lse[..., None])
    dv_j = jnp.einsum('bhnqc,bhnqk->bchk', p, do_bhnqk)
    dp = jnp.einsum('bhnqk,bchk->bhnqc', do_bhnqk, v_j.astype(jnp.float32))
    ds = p * (dp - delta[..., None])
    dqc_j, dqp_j, dk_j, dtable_j = vjp(ds)
    dtable = None if table is None else dtable + dtable_j.astype(jnp.float32)
    return (dqc + dqc_j.astype(jnp.float32), dqp + dqp_j.astype(jnp.float32), dtable), (dk_j, dv_j)

  zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  init = (zeros(qc_n), zeros(qp_n), zeros(table))
  xs = (jnp.arange(0, t, bk), _key_blocks(k, bk), _key_blocks(v, bk), _key_blocks(mask, bk))
  (dqc, dqp, dtable), (dk, dv) = jax.lax.scan(step, init, xs)
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, t, h, kd)  # noqa: E731
  return (dqc.reshape(qc.shape).astype(qc.dtype), dqp.reshape(qp.shape).astype(qp.dtype),
          unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
          None if table is None else dtable.astype(table.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q_content_bthk: jax.Array, q_position_bthk: jax.Array, k_bthk: jax.Array,
                      v_bthk: jax.Array, table_fn, mask_bt: jax.Array, *,
                      block: int = 128) -> jax.Array:
  """softmax((q_c·k + shift(q_p·table)) / sqrt(K)) · v over valid keys, blockwise: [B, T, H, K].

  `table_fn(t)`: the position table over distances -(t-1)..t-1 for a (padded) length t,
  [2t-1, H, K], or None for no positional term. T is padded inside to a multiple of the block
  (padded keys are masked, padded queries dropped).
  """
  b, t, h, kd = q_content_bthk.shape
  blk = min(block, t)
  tp = -(-t // blk) * blk
  pad = lambda x: _pad_to(x, 1, tp)  # noqa: E731
  table = table_fn(tp)
  mask = _pad_to(mask_bt.astype(bool), 1, tp, False)
  out = _attention(pad(q_content_bthk), pad(q_position_bthk), pad(k_bthk), pad(v_bthk), table,
                   mask, blk, blk, 1.0 / math.sqrt(kd))
  return out[:, :t]
