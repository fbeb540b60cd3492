"""SpecAugment (Park et al. 2019) on normalised features: frequency bands and time spans set to
the mean (0), drawn per utterance from a random key."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def spec_augment(key: jax.Array, features_btf: jax.Array, mask_bt: jax.Array, *,
                 num_freq_masks: int = 2, max_freq_width: int = 15, num_time_masks: int = 2,
                 max_time_fraction: float = 0.05, max_time_width: int = 40) -> jax.Array:
  """SpecAugment on normalised features: masked regions are set to 0 (the mean).

  Each utterance gets `num_freq_masks` bands of up to `max_freq_width` channels and
  `num_time_masks` spans of up to min(`max_time_width`, `max_time_fraction`·length) frames.
  """
  b, t, f = features_btf.shape
  lengths = mask_bt.sum(-1)
  k_fw, k_f0, k_tw, k_t0 = jax.random.split(key, 4)
  fw = jax.random.randint(k_fw, (b, num_freq_masks), 0, max_freq_width + 1)
  f0 = (jax.random.uniform(k_f0, (b, num_freq_masks)) * (f - fw)).astype(jnp.int32)
  chans = jnp.arange(f)[None, None, :]
  freq_hit = ((chans >= f0[..., None]) & (chans < (f0 + fw)[..., None])).any(1)  # [B, F]
  max_w = jnp.minimum(max_time_width, (max_time_fraction * lengths).astype(jnp.int32))
  tw = (jax.random.uniform(k_tw, (b, num_time_masks)) * (max_w[:, None] + 1)).astype(jnp.int32)
  t0 = (jax.random.uniform(k_t0, (b, num_time_masks)) *
        jnp.maximum(lengths[:, None] - tw, 0)).astype(jnp.int32)
  steps = jnp.arange(t)[None, None, :]
  time_hit = ((steps >= t0[..., None]) & (steps < (t0 + tw)[..., None])).any(1)  # [B, T]
  hit = freq_hit[:, None, :] | time_hit[:, :, None]
  return jnp.where(hit, 0.0, features_btf)
