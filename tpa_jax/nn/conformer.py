"""Conformer blocks and the layer-scanned encoder with a frozen segment below the lowest adapter.

Block weights are stacked on a leading `layers` axis for all blocks, whichever carry adapters, so
the base's layout never depends on the adapter configuration. Adapters are stacked separately, one
entry per adapted block. The encoder runs as contiguous segments (runs of adapted or unadapted
blocks), each a `lax.scan` (or an unrolled loop) over layer indices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax import sharding
from tpa_jax.errors import ConfigError
from tpa_jax.nn.attention import SelfAttention
from tpa_jax.nn.convolution import ConvModule
from tpa_jax.nn.layers import FeedForward, LayerNorm

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
FFN_RESIDUAL_WEIGHT = 0.5  # macaron FFNs


class ConformerBlock(nnx.Module):
  """x += ½FFN1(x); x += MHSA(x); x += Conv(x); x += ½FFN2(x); x = LN(x), with optional adapters."""

  def __init__(self, dim: int, num_heads: int, ffn_dim: int, conv_kernel_size: int, *,
               position: str = 'relative_key', left_max_position: int = 64,
               right_max_position: int = 8, attention_impl: str = 'xla',
               attention_block: int = 128, conv_causal: bool = False, conv_norm: str = 'layer',
               ffn_bias: bool = True, attention_bias: bool = True, conv_bias: bool = True,
               activation: str = 'swish', eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ffn1 = FeedForward(dim, ffn_dim, use_bias=ffn_bias, activation=activation, **kw)
    self.attention = SelfAttention(dim, num_heads, position=position,
                                   left_max_position=left_max_position,
                                   right_max_position=right_max_position,
                                   use_bias=attention_bias, impl=attention_impl,
                                   block=attention_block, **kw)
    self.conv = ConvModule(dim, conv_kernel_size, causal=conv_causal, norm=conv_norm,
                           use_bias=conv_bias, activation=activation, **kw)
    self.ffn2 = FeedForward(dim, ffn_dim, use_bias=ffn_bias, activation=activation, **kw)
    self.final_norm = LayerNorm(dim, **kw)

  def _ffn(self, ffn: FeedForward, slot: str, x: jax.Array, adapters) -> jax.Array:
    y = _adapt(adapters, slot, x, ffn(x, adapters, slot))  # TPA: x + ½(FFN(x) + A(x))
    return x + FFN_RESIDUAL_WEIGHT * y

  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array, adapters=None) -> jax.Array:
    """`adapters`: the block's residual adapters (BlockAdapters), its LoRA updates (BlockLoRA),
    or any object with their two methods: `adapt(slot, x, y)`, the output `y` of a slot
    ('ffn1', 'mhsa', 'conv', 'ffn2', 'block') whose input is `x`, with the slot's adapters
    added; and `update(target, x)`, the LoRA update of projection `target` (or None)."""
    x_in = x_btd
    x = self._ffn(self.ffn1, 'ffn1', x_btd, adapters)
    x = x + _adapt(adapters, 'mhsa', x, self.attention(x, mask_bt, adapters))
    x = x + _adapt(adapters, 'conv', x, self.conv(x, mask_bt))
    x = self._ffn(self.ffn2, 'ffn2', x, adapters)
    x = _adapt(adapters, 'block', x_in, self.final_norm(x))
    return sharding.constrain(x, ('batch', 'time', 'embed'))


def _adapt(adapters, slot: str, x: jax.Array, y: jax.Array) -> jax.Array:
  return y if adapters is None else adapters.adapt(slot, x, y)


def stack_modules(factory: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """`n` independently initialised copies of a module, stacked on a leading `layers` axis."""
  keys = jax.random.split(rngs.params(), n)
  make = nnx.vmap(lambda key: factory(nnx.Rngs(params=key)), in_axes=0, out_axes=0,
                  transform_metadata={nnx.PARTITION_NAME: 'layers'})
  return make(keys)


def _layers(state: nnx.State, start: int, stop: int) -> nnx.State:
  """Layers [start, stop) of a stacked state (a static slice: its gradient is one pad)."""
  return jax.tree.map(lambda w: w[start:stop], state)


class ConformerEncoder(nnx.Module):
  """Frontend -> conformer blocks (adapters on the selected blocks) -> optional final LayerNorm."""

  def __init__(self, frontend: nnx.Module, make_block: Callable[[nnx.Rngs], ConformerBlock],
               num_blocks: int, *, final_norm: LayerNorm | None = None,
               make_adapters: Callable[[nnx.Rngs], nnx.Module] | None = None,
               adapter_blocks: Sequence[int] = (), scan_layers: bool = True,
               remat_policy: str = 'none', rngs: nnx.Rngs,
               adapter_rngs: nnx.Rngs | None = None):
    if remat_policy not in REMAT_POLICIES:
      raise ConfigError(f'model.remat_policy={remat_policy!r}: accepted values are '
                       f'{tuple(REMAT_POLICIES)}')
    if num_blocks < 1:
      raise ConfigError(f'model.num_blocks={num_blocks}: must be a positive integer')
    adapter_blocks = tuple(adapter_blocks) if make_adapters is not None else ()
    if any(not 0 <= b < num_blocks for b in adapter_blocks) or list(adapter_blocks) != sorted(
        set(adapter_blocks)):
      raise ValueError(f'adapter blocks {adapter_blocks} must be sorted, distinct and in '
                       f'[0, {num_blocks})')
    self.frontend = frontend
    self.num_blocks = num_blocks
    self.blocks = stack_modules(make_block, num_blocks, rngs)
    self.adapter_blocks = adapter_blocks
    self.adapters = (stack_modules(make_adapters, len(adapter_blocks), adapter_rngs if adapter_rngs is not None else rngs)
                     if adapter_blocks else None)
    self.final_norm = final_norm
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy

  def segments(self, start: int) -> list[tuple[int, int, int | None]]:
    """Contiguous runs [a, b) of blocks from `start` up, with the index of the first run block
    in the stacked adapters (None for a run without adapters)."""
    adapted = set(self.adapter_blocks)
    runs, a = [], start
    while a < self.num_blocks:
      b = a
      while b < self.num_blocks and (b in adapted) == (a in adapted):
        b += 1
      runs.append((a, b, self.adapter_blocks.index(a) if a in adapted else None))
      a = b
    return runs

  def _run_segment(self, x: jax.Array, mask_bt: jax.Array, a: int, b: int,
                   adapter_offset: int | None, in_place: bool) -> jax.Array:
    block_def, block_state = nnx.split(self.blocks)
    adapters = None
    if adapter_offset is not None:
      adapter_def, adapter_state = nnx.split(self.adapters)
      adapters = _layers(adapter_state, adapter_offset, adapter_offset + b - a)
    if in_place and (a, b) != (0, self.num_blocks):
      # Block weights that are not differentiated are read in place, one layer per step: a
      # slice of the stack would be a copy of those frozen weights.
      blocks, layer_of = jnp.arange(a, b), lambda i: jax.tree.map(
          lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), block_state)
    else:
      # Differentiated weights are sliced once and scanned over as `xs`: their gradient comes
      # out stacked, instead of each layer's step updating a full-depth gradient buffer.
      blocks, layer_of = _layers(block_state, a, b), lambda layer: layer

    def apply(x, layer):
      block = nnx.merge(block_def, layer_of(layer[0]))
      adapter = nnx.merge(adapter_def, layer[1]) if adapter_offset is not None else None
      return block(x, mask_bt, adapter)

    policy = REMAT_POLICIES[self.remat_policy]
    if self.remat_policy != 'none':
      apply = jax.checkpoint(apply, policy=policy)
    layers = (blocks, adapters)
    if self.scan_layers:
      x, _ = jax.lax.scan(lambda x, layer: (apply(x, layer), None), x, layers)
    else:
      for i in range(b - a):
        x = apply(x, jax.tree.map(lambda w: w[i], layers))
    return x

  def run_blocks(self, x_btd: jax.Array, mask_bt: jax.Array, start: int = 0,
                 stop: int | None = None, *, in_place: bool = False) -> jax.Array:
    """Blocks [start, stop) (default: to the top), segment by segment. `in_place`: the block
    weights are not differentiated (frozen), so partial segments read them from the stack
    instead of slicing a copy."""
    stop = self.num_blocks if stop is None else stop
    for a, b, offset in self.segments(start):
      if a >= stop:
        break
      x_btd = self._run_segment(x_btd, mask_bt, a, min(b, stop), offset, in_place)
    return x_btd

  def hidden_states(self, features_btf: jax.Array, mask_bt: jax.Array
                    ) -> tuple[list[jax.Array], jax.Array]:
    """The frontend's output and every block's output (before the final norm): num_blocks + 1
    arrays [B, T', D], and their mask. What layer-wise probes read; the block weights are read
    in place (not differentiated)."""
    x, mask = self.frontend(features_btf, mask_bt)
    layers = [x]
    for k in range(self.num_blocks):
      x = self.run_blocks(x, mask, k, k + 1, in_place=True)
      layers.append(x)
    return layers, mask

  def finish(self, x_btd: jax.Array) -> jax.Array:
    return self.final_norm(x_btd) if self.final_norm is not None else x_btd

  def __call__(self, features_btf: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, mask = self.frontend(features_btf, mask_bt)
    return self.finish(self.run_blocks(x, mask)), mask
