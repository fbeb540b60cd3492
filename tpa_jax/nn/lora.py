"""LoRA (Hu et al. 2021, arXiv 2106.09685) on the projections of a conformer block, and `merge`.

A projection y = x·W + b of a LoRA target becomes y = x·W + b + (alpha / r)·(x·A)·B with A
(in -> r) drawn at random and B (r -> out) zero, so the model equals its base at step 0. A and B
are `LoRAParam`s: the `adapters` trainable filter trains them, the same step as the residual
adapters. LoRA weights sit with the other adapters (stacked per adapted block, apart from the
base's stack), so the base's layout does not depend on them; `merge` folds them into the frozen
weights for inference.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax.config.selection import TARGETS
from tpa_jax.errors import ConfigError
from tpa_jax.nn.layers import Dense
from tpa_jax.nn.params import LoRAParam



def target_shapes(dim: int, num_heads: int, ffn_dim: int) -> dict[str, tuple[tuple, tuple, tuple]]:
  """target -> (in_shape, out_shape, kernel axes) of the projection it adapts."""
  hk = (num_heads, dim // num_heads)
  qkv = ((dim,), hk, ('embed', 'heads', 'kv'))
  up, down = ((dim,), (ffn_dim,), ('embed', 'mlp')), ((ffn_dim,), (dim,), ('mlp', 'embed'))
  return {'q': qkv, 'k': qkv, 'v': qkv, 'out': (hk, (dim,), ('heads', 'kv', 'embed')),
          'ffn1_up': up, 'ffn1_down': down, 'ffn2_up': up, 'ffn2_down': down}


class LoRA(nnx.Module):
  """The low-rank update (alpha / r)·(x·A)·B of one projection."""

  def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple, *,
               rank: int, alpha: float, dtype=jnp.float32, rngs: nnx.Rngs):
    n_in = len(in_shape)
    kw = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, param_type=LoRAParam,
              rngs=rngs)
    self.scale = alpha / rank
    # A as a kaiming-uniform-like draw over the input dims; B zero (identity at init).
    self.a = Dense(in_shape, rank, axes=axes[:n_in] + ('adapter',), **kw)
    self.b = Dense(rank, out_shape, axes=('adapter',) + axes[n_in:],
                   kernel_init=nnx.initializers.zeros_init(), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.scale * self.b(self.a(x))

  def delta(self) -> jax.Array:
    """(alpha / r)·A·B as a kernel of the projection's shape (in_shape + out_shape)."""
    a, b = self.a.kernel[...], self.b.kernel[...]
    return self.scale * jnp.tensordot(a, b, axes=1)


class BlockLoRA(nnx.Module):
  """The LoRA updates of one conformer block; `placement` is 'lora' for the block to see."""

  placement = 'lora'

  def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, rank: int, alpha: float,
               targets: Sequence[str], dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(rank, int) or rank <= 0:
      raise ConfigError(f'adapter.bottleneck={rank!r} (the LoRA rank): must be a positive '
                       'integer')
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
      raise ConfigError(f'adapter.lora_alpha={alpha!r}: must be a positive number')
    shapes = target_shapes(dim, num_heads, ffn_dim)
    self.slots = nnx.Dict({t: LoRA(*shapes[t], rank=rank, alpha=float(alpha), dtype=dtype,
                                   rngs=rngs) for t in targets})

  def update(self, target: str, x: jax.Array) -> jax.Array | None:
    """The update of projection `target` for its input `x` (None when it is not a target)."""
    return self.slots[target](x) if target in self.slots else None

  def adapt(self, slot: str, x: jax.Array, y: jax.Array) -> jax.Array:
    del slot, x  # LoRA adds no residual adapter
    return y


def merge(model: nnx.Module) -> nnx.Module:
  """The model with its LoRA updates folded into the frozen block weights and the LoRA weights
  removed: the same outputs (up to rounding), the cost of the base. Changes `model` in place
  and returns it."""
  encoder = model.encoder
  if encoder.adapters is None or getattr(encoder.adapters, 'placement', None) != 'lora':
    raise ValueError('merge: the model carries no LoRA weights')
  lora_state = nnx.state(encoder.adapters)
  blocks = encoder.blocks
  for i, block in enumerate(encoder.adapter_blocks):
    for target in encoder.adapters.slots:
      module, proj = TARGETS[target]
      kernel = getattr(getattr(blocks, module), proj).kernel
      layer = jax.tree.map(lambda w: w[i], lora_state['slots'][target])
      lora = nnx.merge(nnx.graphdef(encoder.adapters.slots[target]), layer)
      kernel[...] = kernel[...].at[block].add(lora.delta().astype(kernel.dtype))
  encoder.adapters = None
  encoder.adapter_blocks = ()
  return model
