"""Log-mel filterbanks (HTK mel scale, Hann window, no centring) and per-utterance
normalisation, in JAX, computed on device inside the step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def hz_to_mel(hz):
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(num_mels: int, n_fft: int, sample_rate_hz: int, low_hz: float,
                   high_hz: float) -> np.ndarray:
  """Triangular HTK-mel filters [n_fft//2 + 1, num_mels] over the rfft bins."""
  bins_hz = np.arange(n_fft // 2 + 1) * sample_rate_hz / n_fft
  edges = mel_to_hz(np.linspace(hz_to_mel(low_hz), hz_to_mel(high_hz), num_mels + 2))
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins_hz[:, None] - lower) / (center - lower)
  falling = (upper - bins_hz[:, None]) / (upper - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def num_frames(num_samples, window: int, hop: int):
  """Frames whose whole window lies on the first `num_samples` samples (0 if too short)."""
  return jnp.maximum((num_samples - window) // hop + 1, 0)


def log_mel(audio_bs: jax.Array, lengths_b: jax.Array, *, sample_rate_hz: int = 16000,
            window_ms: float = 25.0, hop_ms: float = 10.0, num_mels: int = 80,
            n_fft: int | None = None, low_hz: float = 20.0, high_hz: float | None = None,
            preemphasis: float = 0.97, floor: float = 1e-8) -> tuple[jax.Array, jax.Array]:
  """Log-mel filterbanks [B, T, num_mels] (float32) and the frame mask [B, T].

  `audio_bs` is int16 (or float in [-1, 1]) padded to a common length; `lengths_b` counts its
  valid samples. Frames are Hann-windowed, not centred: frame t covers samples
  [t·hop, t·hop + window), and is valid if that range lies within the utterance.
  """
  window = int(round(sample_rate_hz * window_ms / 1000))
  hop = int(round(sample_rate_hz * hop_ms / 1000))
  n_fft = n_fft or 1 << (window - 1).bit_length()
  high_hz = high_hz or sample_rate_hz / 2
  x = audio_bs.astype(jnp.float32)
  if jnp.issubdtype(audio_bs.dtype, jnp.integer):
    x = x / 32768.0
  t = max((x.shape[1] - window) // hop + 1, 0)
  index = jnp.arange(t)[:, None] * hop + jnp.arange(window)[None, :]
  frames = x[:, index]  # [B, T, window]
  if preemphasis:
    previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = frames - preemphasis * previous
  hann = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(window) / window)
  spectrum = jnp.fft.rfft(frames * hann, n=n_fft)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  mel = power @ mel_filterbank(num_mels, n_fft, sample_rate_hz, low_hz, high_hz)
  mask = jnp.arange(t)[None, :] < num_frames(lengths_b, window, hop)[:, None]
  return jnp.log(jnp.maximum(mel, floor)), mask


def normalize(features_btf: jax.Array, mask_bt: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Per-utterance, per-channel mean and variance normalisation over valid frames; padded
  frames become 0."""
  w = mask_bt[..., None].astype(jnp.float32)
  count = jnp.maximum(w.sum(1, keepdims=True), 1.0)
  mean = (features_btf * w).sum(1, keepdims=True) / count
  var = (jnp.square(features_btf - mean) * w).sum(1, keepdims=True) / count
  return jnp.where(mask_bt[..., None], (features_btf - mean) * jax.lax.rsqrt(var + eps), 0.0)
