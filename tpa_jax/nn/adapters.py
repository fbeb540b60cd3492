"""Residual adapters, their placements in a conformer block, and block selections.

A residual adapter is A(x) = W_up · relu(W_down · LN(x) + b_down) + b_up with W_up, b_up zero at
init, so an adapted model equals its frozen base exactly at step 0.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax.errors import ConfigError
from tpa_jax.nn.layers import Dense, LayerNorm
from tpa_jax.nn.params import AdapterParam

# placement -> the adapter slots one block carries. `ff_parallel` on both FFNs is TPA.
PLACEMENTS: dict[str, tuple[str, ...]] = {
    'ff_parallel': ('ffn1', 'ffn2'),
    'ff_sequential': ('ffn1', 'ffn2'),
    'block_parallel': ('block',),
    'block_sequential': ('block',),
    'mhsa_parallel': ('mhsa',),
    'conv_parallel': ('conv',),
}
ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': jax.nn.gelu, 'swish': jax.nn.silu}
UP_INITS = ('zeros', 'normal')
# Placements whose adapter reads its module's output (the others read its input, beside it).
SEQUENTIAL = ('ff_sequential', 'block_sequential')


# Placements whose weights are not residual adapters: low-rank updates of the block's own
# projections (tpa_jax/nn/lora.py).
OTHER_PLACEMENTS = ('lora',)


def check_placement(placement: str) -> str:
  if placement not in PLACEMENTS and placement not in OTHER_PLACEMENTS:
    raise ConfigError(f'adapter.placement={placement!r}: accepted values are '
                     f'{tuple(PLACEMENTS) + OTHER_PLACEMENTS}')
  return placement


class ResidualAdapter(nnx.Module):
  """LayerNorm -> down (dim -> bottleneck) -> activation -> up (bottleneck -> dim)."""

  def __init__(self, dim: int, bottleneck: int, *, use_norm: bool = True,
               activation: str = 'relu', up_init: str = 'zeros', eps: float = 1e-5,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(bottleneck, int) or bottleneck <= 0:
      raise ConfigError(f'adapter.bottleneck={bottleneck!r}: must be a positive integer')
    if activation not in ACTIVATIONS:
      raise ConfigError(f'adapter.activation={activation!r}: accepted values are '
                       f'{tuple(ACTIVATIONS)}')
    if up_init not in UP_INITS:
      raise ConfigError(f'adapter.up_init={up_init!r}: accepted values are {UP_INITS}')
    kw = dict(dtype=dtype, param_dtype=param_dtype, param_type=AdapterParam, rngs=rngs)
    self.activation = activation
    self.norm = LayerNorm(dim, eps=eps, **kw) if use_norm else None
    self.down = Dense(dim, bottleneck, axes=('embed', 'adapter'), **kw)
    up_kernel_init = (nnx.initializers.zeros_init() if up_init == 'zeros'
                      else nnx.initializers.normal(1e-3))
    self.up = Dense(bottleneck, dim, axes=('adapter', 'embed'), kernel_init=up_kernel_init, **kw)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    h = self.norm(x_btd) if self.norm is not None else x_btd
    return self.up(ACTIVATIONS[self.activation](self.down(h)))


class BlockAdapters(nnx.Module):
  """The adapters of one conformer block for one placement, with the residual weight they use."""

  def __init__(self, placement: str, dim: int, bottleneck: int, *, residual_weight: float = 1.0,
               rngs: nnx.Rngs, **adapter_kw):
    self.placement = check_placement(placement)
    self.residual_weight = residual_weight
    self.slots = nnx.Dict({slot: ResidualAdapter(dim, bottleneck, rngs=rngs, **adapter_kw)
                           for slot in PLACEMENTS[placement]})

  def __call__(self, slot: str, x_btd: jax.Array) -> jax.Array:
    """The weighted adapter output for `slot`, to be added to a residual stream."""
    return self.residual_weight * self.slots[slot](x_btd)

  def adapt(self, slot: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """`y`, the output of `slot` for its input `x`, plus the slot's adapter: A(x) beside the
    module (parallel placements), A(y) after it (sequential ones)."""
    if slot not in self.slots:
      return y
    return y + self(slot, y if self.placement in SEQUENTIAL else x)

  def update(self, target: str, x: jax.Array) -> None:
    del target, x  # residual adapters change no projection
    return None


def without_blocks(model: nnx.Module, blocks: Sequence[int]) -> nnx.Module:
  """`model` with the adapters of `blocks` removed, without retraining: their output
  projections are zeroed (residual adapters: W_up and b_up; LoRA: B), which makes their
  contribution exactly zero, as if they were never attached. Returns a copy."""
  model = nnx.clone(model)
  encoder = model.encoder
  removed = [encoder.adapter_blocks.index(b) for b in blocks if b in encoder.adapter_blocks]
  if not removed:
    return model
  rows = jnp.asarray(removed)
  for path, variable in nnx.iter_graph(encoder.adapters):
    names = [str(p) for p in path]
    last_module = names[-2] if len(names) >= 2 else ''
    if isinstance(variable, AdapterParam) and last_module in ('up', 'b'):
      variable[...] = variable[...].at[rows].set(0)
  return model
