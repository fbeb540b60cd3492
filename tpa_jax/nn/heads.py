"""Task heads. Their weights are HeadParam, so they train together with the adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax.errors import ConfigError
from tpa_jax.nn.layers import Dense
from tpa_jax.nn.params import HeadParam


class CTCHead(nnx.Module):
  """Per-frame logits over a vocabulary whose id 0 is the CTC blank."""

  def __init__(self, dim: int, vocab_size: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if vocab_size < 2:
      raise ConfigError(f'head.vocab_size={vocab_size}: needs the blank plus at least one token')
    # Logits accumulate in float32 whatever the compute dtype: the loss's softmax reads them.
    self.proj = Dense(dim, vocab_size, axes=('embed', 'vocab'), dtype=dtype,
                      param_dtype=param_dtype, param_type=HeadParam, out_dtype=jnp.float32,
                      rngs=rngs)

  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    del mask_bt  # the loss and the decoder read the mask
    return self.proj(x_btd)


class ClassificationHead(nnx.Module):
  """Masked mean over valid frames, then a linear classifier: one logit vector per utterance."""

  def __init__(self, dim: int, num_classes: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_classes < 2:
      raise ConfigError(f'head.num_classes={num_classes}: needs at least two classes')
    self.proj = Dense(dim, num_classes, axes=('embed', 'vocab'), dtype=dtype,
                      param_dtype=param_dtype, param_type=HeadParam, out_dtype=jnp.float32,
                      rngs=rngs)

  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    w_bt = mask_bt.astype(jnp.float32)
    pooled_bd = jnp.einsum('btd,bt->bd', x_btd.astype(jnp.float32), w_bt)
    pooled_bd = pooled_bd / jnp.maximum(w_bt.sum(-1, keepdims=True), 1.0)
    return self.proj(pooled_bd)
