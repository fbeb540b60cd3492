"""The chunked attention (tpa_jax/nn/chunked_attention.py) as Pallas kernels: one forward kernel
and two backward kernels (keys and values; queries and the position table), as flash attention
splits them, under a `jax.custom_vjp`.

Inputs are per head, [B, H, T, K], with T padded to a multiple of the block. Scores, softmax
statistics and every accumulator are float32 whatever the input dtype (bf16 on accelerators).

Positions: the table holds one row per distance j - i (row r is distance r - (T-1)), padded to
2T rows so that every block reads W = bq + bk rows: for query block [i0, i0+bq) and key block
[j0, j0+bk), rows j0 - i0 - bq + T .. + W. The query-by-row products [bq, W] become the block's
positional scores [bq, bk] by rotating row a left by (bq-1) - a (`pltpu.roll` with a stride:
one lane rotation per row on a TPU) and keeping the first bk columns; the backward pass rotates
the other way.

Grid order and the table's gradient: the queries' kernel adds each block's table gradient into
one [2T, K] block per head, so its batch and query-block axes run in order ('arbitrary'), as a
TPU's grid does; the head axis is parallel. GPUs run grid programs concurrently, and this
kernel's rotations have no Triton lowering, so on a GPU `attention_impl='pallas'` runs the
chunked attention instead (tpa_jax/nn/attention.py:resolve_impl says so in the log).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_MASKED = -1e30  # as in attention.py: finite in float32, exp() underflows to exactly 0
_SUBLANES = 8  # a TPU tile's rows: blocks are multiples of it


def _dot_t(a, b):
  """a @ b.T in float32: [m, k] x [n, k] -> [m, n]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a.T @ b in float32: [m, k] x [m, n] -> [k, n]."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def shift_rows(x_qw: jax.Array, bk: int) -> jax.Array:
  """y[a, c] = x[a, (bq-1) - a + c]: [bq, bq + bk] -> [bq, bk] (block_shift, by rotation)."""
  return pltpu.roll(x_qw, bk + 1, 1, stride=1, stride_axis=0)[:, :bk]


def unshift_rows(y_qc: jax.Array, bq: int) -> jax.Array:
  """The transpose of `shift_rows`: x[a, (bq-1) - a + c] = y[a, c], zero elsewhere, [bq, bq + bk]."""
  bk = y_qc.shape[1]
  padded = jnp.concatenate([y_qc, jnp.zeros((bq, bq), y_qc.dtype)], axis=1)
  return pltpu.roll(padded, bq - 1, 1, stride=bq + bk - 1, stride_axis=0)


def _scores(qc, qp, k_j, table_ref, mask_j, i0, j0, *, t, scale):
  """Scaled, masked scores of query block i0 against key block j0 (keys k_j [bk, K], their mask
  [1, bk]): [bq, bk] float32."""
  bq, bk = qc.shape[0], k_j.shape[0]
  s = _dot_t(qc, k_j)
  if table_ref is not None:
    rows = table_ref[pl.ds(j0 - i0 - bq + t, bq + bk), :]
    s = s + shift_rows(_dot_t(qp, rows), bk)
  return jnp.where(mask_j > 0, s * scale, _MASKED)


def _forward_kernel(*refs, bk, t, scale, has_table):
  if has_table:
    qc_ref, qp_ref, k_ref, v_ref, table_ref, mask_ref, o_ref, lse_ref = refs
  else:
    (qc_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref), qp_ref, table_ref = refs, None, None
  bq, kd = qc_ref.shape
  i0 = pl.program_id(2) * bq
  qc = qc_ref[...]
  qp = None if qp_ref is None else qp_ref[...]

  def body(j, carry):
    m_i, l_i, acc = carry
    j0 = pl.multiple_of(j * bk, bk)
    s = _scores(qc, qp, k_ref[pl.ds(j0, bk), :], table_ref, mask_ref[:, pl.ds(j0, bk)], i0, j0,
                t=t, scale=scale)
    m_new = jnp.maximum(m_i, s.max(-1, keepdims=True))
    p = jnp.exp(s - m_new)
    corr = jnp.exp(m_i - m_new)
    pv = _dot(p.astype(v_ref.dtype), v_ref[pl.ds(j0, bk), :])
    return m_new, l_i * corr + p.sum(-1, keepdims=True), acc * corr + pv

  init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, kd), jnp.float32))
  m_i, l_i, acc = jax.lax.fori_loop(0, t // bk, body, init)
  o_ref[...] = (acc / l_i).astype(o_ref.dtype)
  lse_ref[...] = m_i + jnp.log(l_i)


def _keys_kernel(*refs, bq, t, scale, has_table):
  """dk and dv of one key block, over every query block."""
  if has_table:
    (qc_ref, qp_ref, k_ref, v_ref, table_ref, mask_ref, do_ref, lse_ref, delta_ref,
     dk_ref, dv_ref) = refs
  else:
    (qc_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = refs
    qp_ref = table_ref = None
  bk, kd = k_ref.shape
  j0 = pl.program_id(2) * bk
  k_j, v_j, mask_j = k_ref[...], v_ref[...], mask_ref[...]

  def body(i, carry):
    dk, dv = carry
    i0 = pl.multiple_of(i * bq, bq)
    qc = qc_ref[pl.ds(i0, bq), :]
    qp = None if qp_ref is None else qp_ref[pl.ds(i0, bq), :]
    s = _scores(qc, qp, k_j, table_ref, mask_j, i0, j0, t=t, scale=scale)
    p = jnp.exp(s - lse_ref[pl.ds(i0, bq), :])
    do = do_ref[pl.ds(i0, bq), :]
    dv = dv + _dot_tn(p.astype(do.dtype), do)
    ds = p * (_dot_t(do, v_j) - delta_ref[pl.ds(i0, bq), :]) * scale
    return dk + _dot_tn(ds.astype(qc.dtype), qc), dv

  zeros = jnp.zeros((bk, kd), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, t // bq, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _queries_kernel(*refs, bk, t, scale, has_table):
  """dq (content and position) of one query block over every key block, and its share of the
  table's gradient, added into the head's [2T, K] block."""
  if has_table:
    (qc_ref, qp_ref, k_ref, v_ref, table_ref, mask_ref, do_ref, lse_ref, delta_ref,
     dqc_ref, dqp_ref, dtable_ref) = refs
  else:
    (qc_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dqc_ref) = refs
    qp_ref = table_ref = dqp_ref = dtable_ref = None
  bq, kd = qc_ref.shape
  i0 = pl.program_id(2) * bq
  qc, do, lse, delta = qc_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  qp = None if qp_ref is None else qp_ref[...]
  if dtable_ref is not None:
    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
      dtable_ref[...] = jnp.zeros(dtable_ref.shape, dtable_ref.dtype)

  def body(j, carry):
    dqc, dqp = carry
    j0 = pl.multiple_of(j * bk, bk)
    k_j = k_ref[pl.ds(j0, bk), :]
    s = _scores(qc, qp, k_j, table_ref, mask_ref[:, pl.ds(j0, bk)], i0, j0, t=t, scale=scale)
    p = jnp.exp(s - lse)
    ds = p * (_dot_t(do, v_ref[pl.ds(j0, bk), :]) - delta) * scale
    dqc = dqc + _dot(ds.astype(k_j.dtype), k_j)
    if table_ref is not None:
      start = j0 - i0 - bq + t
      rows = table_ref[pl.ds(start, bq + bk), :]
      ds_w = unshift_rows(ds, bq)
      dqp = dqp + _dot(ds_w.astype(rows.dtype), rows)
      dtable_ref[pl.ds(start, bq + bk), :] += _dot_tn(ds_w.astype(qp.dtype), qp)
    return dqc, dqp

  zeros = jnp.zeros((bq, kd), jnp.float32)
  dqc, dqp = jax.lax.fori_loop(0, t // bk, body, (zeros, zeros))
  dqc_ref[...] = dqc.astype(dqc_ref.dtype)
  if dqp_ref is not None:
    dqp_ref[...] = dqp.astype(dqp_ref.dtype)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _specs(*shapes_and_maps):
  return [pl.BlockSpec(shape, index_map) for shape, index_map in shapes_and_maps]


def _forward(qc, qp, k, v, table, mask, bq, bk, interpret):
  b, h, t, kd = qc.shape
  has_table = table is not None
  scale = 1.0 / math.sqrt(kd)
  block_q = ((None, None, bq, kd), lambda b_, h_, i: (b_, h_, i, 0))
  whole = ((None, None, t, kd), lambda b_, h_, i: (b_, h_, 0, 0))
  rows = ((None, 2 * t, kd), lambda b_, h_, i: (h_, 0, 0))
  keys_mask = ((None, 1, t), lambda b_, h_, i: (b_, 0, 0))
  in_specs = [block_q, *([block_q] if has_table else []), whole, whole,
              *([rows] if has_table else []), keys_mask]
  args = [qc, *([qp] if has_table else []), k, v, *([table] if has_table else []), mask]
  kernel = functools.partial(_forward_kernel, bk=bk, t=t, scale=scale, has_table=has_table)
  return pl.pallas_call(
      kernel, grid=(b, h, t // bq), in_specs=_specs(*in_specs),
      out_specs=_specs(block_q, ((None, None, bq, 1), lambda b_, h_, i: (b_, h_, i, 0))),
      out_shape=[jax.ShapeDtypeStruct(qc.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',) * 3),
      interpret=interpret, name='rel_attention_fwd')(*args)


def _backward(qc, qp, k, v, table, mask, out, lse, d_out, bq, bk, interpret):
  b, h, t, kd = qc.shape
  has_table = table is not None
  scale = 1.0 / math.sqrt(kd)
  delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)
  # Keys and values: grid (B, H, key blocks), each program over every query block.
  block_k = ((None, None, bk, kd), lambda b_, h_, j: (b_, h_, j, 0))
  whole = ((None, None, t, kd), lambda b_, h_, j: (b_, h_, 0, 0))
  whole_stat = ((None, None, t, 1), lambda b_, h_, j: (b_, h_, 0, 0))
  rows = ((None, 2 * t, kd), lambda b_, h_, j: (h_, 0, 0))
  in_specs = [whole, *([whole] if has_table else []), block_k, block_k,
              *([rows] if has_table else []), ((None, 1, bk), lambda b_, h_, j: (b_, 0, j)),
              whole, whole_stat, whole_stat]
  args = [qc, *([qp] if has_table else []), k, v, *([table] if has_table else []), mask, d_out,
          lse, delta]
  dk, dv = pl.pallas_call(
      functools.partial(_keys_kernel, bq=bq, t=t, scale=scale, has_table=has_table),
      grid=(b, h, t // bk), in_specs=_specs(*in_specs), out_specs=_specs(block_k, block_k),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',) * 3),
      interpret=interpret, name='rel_attention_bwd_kv')(*args)
  # Queries and the table: grid (H, B, query blocks); the table's gradient block of head h is
  # revisited by every (batch, query block), so those two axes run in order.
  block_q = ((None, None, bq, kd), lambda h_, b_, i: (b_, h_, i, 0))
  block_stat = ((None, None, bq, 1), lambda h_, b_, i: (b_, h_, i, 0))
  whole = ((None, None, t, kd), lambda h_, b_, i: (b_, h_, 0, 0))
  rows = ((None, 2 * t, kd), lambda h_, b_, i: (h_, 0, 0))
  in_specs = [block_q, *([block_q] if has_table else []), whole, whole,
              *([rows] if has_table else []), ((None, 1, t), lambda h_, b_, i: (b_, 0, 0)),
              block_q, block_stat, block_stat]
  out_specs = [block_q, *([block_q, rows] if has_table else [])]
  out_shape = [jax.ShapeDtypeStruct(qc.shape, qc.dtype)]
  if has_table:
    out_shape += [jax.ShapeDtypeStruct(qp.shape, qp.dtype),
                  jax.ShapeDtypeStruct(table.shape, jnp.float32)]
  grads = pl.pallas_call(
      functools.partial(_queries_kernel, bk=bk, t=t, scale=scale, has_table=has_table),
      grid=(h, b, t // bq), in_specs=_specs(*in_specs), out_specs=_specs(*out_specs),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'arbitrary', 'arbitrary')),
      interpret=interpret, name='rel_attention_bwd_q')(*args)
  if has_table:
    dqc, dqp, dtable = grads
    return dqc, dqp, dk, dv, dtable.astype(table.dtype), None
  return grads[0], None, dk, dv, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(qc, qp, k, v, table, mask, bq, bk, interpret):
  return _forward(qc, qp, k, v, table, mask, bq, bk, interpret)[0]


def _attention_fwd(qc, qp, k, v, table, mask, bq, bk, interpret):
  out, lse = _forward(qc, qp, k, v, table, mask, bq, bk, interpret)
  return out, (qc, qp, k, v, table, mask, out, lse)


def _attention_bwd(bq, bk, interpret, res, d_out):
  return _backward(*res, d_out, bq, bk, interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


def pallas_attention(q_content_bthk: jax.Array, q_position_bthk: jax.Array, k_bthk: jax.Array,
                     v_bthk: jax.Array, table_fn, mask_bt: jax.Array, *, block: int = 128,
                     interpret: bool = False) -> jax.Array:
  """`chunked_attention` (same arguments and result, [B, T, H, K]) as Pallas kernels.

  The block is rounded up to a multiple of 8 (a TPU tile's rows) and T padded to a multiple of
  it inside (padded keys masked, padded queries dropped). `interpret=True` runs the kernels on
  any backend (CPU tests); otherwise they lower with Mosaic for a TPU.
  """
  b, t, h, kd = q_content_bthk.shape
  blk = _round_up(min(block, t), _SUBLANES)
  tp = _round_up(t, blk)
  heads_first = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))), 2, 1)  # noqa: E731
  table = table_fn(tp)
  if table is not None:  # [2tp-1, H, K] -> [H, 2tp, K]: one unused row so every block reads W rows
    table = jnp.moveaxis(jnp.pad(table, ((0, 1), (0, 0), (0, 0))), 1, 0)
  qp = None if table is None else heads_first(q_position_bthk)
  mask = jnp.pad(mask_bt.astype(jnp.float32), ((0, 0), (0, tp - t)))[:, None, :]
  out_bhtk = _attention(heads_first(q_content_bthk), qp, heads_first(k_bthk),
                        heads_first(v_bthk), table, mask, blk, blk, interpret)
  return jnp.moveaxis(out_bhtk, 1, 2)[:, :t]
