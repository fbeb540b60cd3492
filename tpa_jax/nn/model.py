"""SpeechModel: a conformer encoder plus a task head, runnable as frozen prefix + trained suffix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax.nn.conformer import ConformerEncoder


def check_inputs(features_btf: jax.Array, mask_bt: jax.Array, input_dim: int) -> None:
  """Rejects inputs of the wrong rank, dtype or size with an error naming the argument."""
  if getattr(features_btf, 'ndim', None) != 3:
    raise ValueError(f'features must be [batch, frames, {input_dim}], got shape '
                     f'{getattr(features_btf, "shape", type(features_btf))}')
  if not jnp.issubdtype(features_btf.dtype, jnp.floating):
    raise TypeError(f'features must be a floating dtype (float32 or bfloat16), got '
                    f'{features_btf.dtype}')
  if features_btf.shape[-1] != input_dim:
    raise ValueError(f'features have {features_btf.shape[-1]} channels, the frontend expects '
                     f'model.frontend.input_dim={input_dim}')
  if getattr(mask_bt, 'ndim', None) != 2 or mask_bt.shape != features_btf.shape[:2]:
    raise ValueError(f'feature_mask must be [batch, frames] = {features_btf.shape[:2]}, got '
                     f'{getattr(mask_bt, "shape", type(mask_bt))}')
  if mask_bt.dtype != jnp.bool_:
    raise TypeError(f'feature_mask must be bool (True on valid frames), got {mask_bt.dtype}')


class SpeechModel(nnx.Module):
  """Encoder + head. `frozen_depth` splits the forward pass: the frontend and the first
  `frozen_depth` blocks form the frozen prefix (None: nothing is frozen, the frontend trains)."""

  def __init__(self, encoder: ConformerEncoder, head: nnx.Module):
    self.encoder = encoder
    self.head = head

  def prefix(self, features_btf: jax.Array, mask_bt: jax.Array,
             frozen_depth: int | None) -> tuple[jax.Array, jax.Array]:
    """Runs the frozen prefix; returns its output and mask (the inputs when nothing is frozen)."""
    check_inputs(features_btf, mask_bt, self.encoder.frontend.input_dim)
    if frozen_depth is None:
      return features_btf, mask_bt
    x, mask = self.encoder.frontend(features_btf, mask_bt)
    return self.encoder.run_blocks(x, mask, 0, frozen_depth, in_place=True), mask

  def suffix(self, x: jax.Array, mask: jax.Array, frozen_depth: int | None, *,
             blocks_frozen: bool = False) -> tuple[jax.Array, jax.Array]:
    """Runs everything above the frozen prefix; returns (logits, encoder mask).
    `blocks_frozen`: no block weight is differentiated (adapters or the head train), so they
    are read in place."""
    if frozen_depth is None:
      x, mask = self.encoder.frontend(x, mask)
      frozen_depth = 0
    x = self.encoder.finish(self.encoder.run_blocks(x, mask, frozen_depth,
                                                    in_place=blocks_frozen))
    return self.head(x, mask), mask

  def __call__(self, features_btf: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits and their mask. For inference: block weights are read in place (differentiating
    this call through the blocks is correct, but slower than the train step's split)."""
    return self.suffix(*self.prefix(features_btf, mask_bt, None), None, blocks_frozen=True)

  @staticmethod
  def blocks_train(trainable: nnx.State) -> bool:
    """Whether any weight of the stacked blocks is in `trainable` (full fine-tuning)."""
    return any(path[:2] == ('encoder', 'blocks') for path, _ in nnx.to_flat_state(trainable))

  def encode(self, features_btf: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Last hidden state [B, T', D] and its mask, without the head."""
    check_inputs(features_btf, mask_bt, self.encoder.frontend.input_dim)
    return self.encoder(features_btf, mask_bt)

  def frozen_depth(self, trainable: nnx.State) -> int | None:
    """How deep the frozen prefix can go given which variables train: None if the frontend
    trains, else the lowest block holding a trainable weight (num_blocks if only the head or the
    final norm train)."""
    depth = self.encoder.num_blocks
    for path, _ in nnx.to_flat_state(trainable):
      if path[0] != 'encoder':
        continue
      part = path[1]
      if part == 'frontend':
        return None
      if part == 'blocks':
        depth = 0
      elif part == 'adapters':
        depth = min(depth, self.encoder.adapter_blocks[0])
    return depth
