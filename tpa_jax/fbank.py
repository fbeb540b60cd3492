"""Kaldi-compatible filterbanks in JAX: the front end of w2v-BERT 2.0 (SeamlessM4T).

Per frame (25 ms window, 10 ms hop, no centring): the DC offset is removed, pre-emphasis is
applied (the first sample is scaled by 1 - coefficient), the Povey window (Hann to the power 0.85)
weights the samples, and the power spectrum (512-point FFT) is pooled by triangular filters that
are triangles on the Kaldi mel scale (1127·ln(1 + f/700)), 20 Hz to Nyquist. Audio is in 16-bit
sample units. Log energies are normalised per bin over the utterance with the unbiased variance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Normalisation epsilon of SeamlessM4TFeatureExtractor (added to the unbiased variance).
NORM_EPS = 1e-7


def kaldi_mel(hz):
  return 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def kaldi_mel_filterbank(num_mels: int, n_fft: int, sample_rate_hz: int, low_hz: float,
                         high_hz: float) -> np.ndarray:
  """Filters [n_fft//2 + 1, num_mels]: triangles in mel space over the mel value of each rfft
  bin, their edges equally spaced in mel from `low_hz` to `high_hz`."""
  bins_mel = kaldi_mel(np.arange(n_fft // 2 + 1) * sample_rate_hz / n_fft)
  edges = np.linspace(kaldi_mel(low_hz), kaldi_mel(high_hz), num_mels + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins_mel[:, None] - lower) / (center - lower)
  falling = (upper - bins_mel[:, None]) / (upper - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def povey_window(window: int) -> np.ndarray:
  """Kaldi's default window: a symmetric Hann window raised to the power 0.85."""
  return (np.hanning(window) ** 0.85).astype(np.float32)


def num_frames(num_samples, window: int, hop: int):
  """Frames whose whole window lies on the first `num_samples` samples (0 if too short)."""
  return jnp.maximum((num_samples - window) // hop + 1, 0)


def kaldi_fbank(audio_bs: jax.Array, lengths_b: jax.Array, *, sample_rate_hz: int = 16000,
                window_ms: float = 25.0, hop_ms: float = 10.0, num_mels: int = 80,
                n_fft: int | None = None, low_hz: float = 20.0, high_hz: float | None = None,
                preemphasis: float = 0.97, floor: float = 1.1920929e-07
                ) -> tuple[jax.Array, jax.Array]:
  """Log filterbank energies [B, T, num_mels] (float32) and the frame mask [B, T].

  `audio_bs` is int16 (or float in [-1, 1], scaled to 16-bit units as Kaldi expects) padded to
  a common length; `lengths_b` counts its valid samples. A frame is valid if its whole window
  lies within the utterance; valid frames never read padding.
  """
  window = int(round(sample_rate_hz * window_ms / 1000))
  hop = int(round(sample_rate_hz * hop_ms / 1000))
  n_fft = n_fft or 1 << (window - 1).bit_length()
  high_hz = high_hz or sample_rate_hz / 2
  x = audio_bs.astype(jnp.float32)
  if not jnp.issubdtype(audio_bs.dtype, jnp.integer):
    x = x * 32768.0
  t = max((x.shape[1] - window) // hop + 1, 0)
  index = jnp.arange(t)[:, None] * hop + jnp.arange(window)[None, :]
  frames = x[:, index]  # [B, T, window]
  frames = frames - frames.mean(-1, keepdims=True)
  if preemphasis:
    previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = frames - preemphasis * previous
  spectrum = jnp.fft.rfft(frames * povey_window(window), n=n_fft)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  mel = power @ kaldi_mel_filterbank(num_mels, n_fft, sample_rate_hz, low_hz, high_hz)
  mask = jnp.arange(t)[None, :] < num_frames(lengths_b, window, hop)[:, None]
  return jnp.log(jnp.maximum(mel, floor)), mask


def normalize_unbiased(features_btf: jax.Array, mask_bt: jax.Array,
                       eps: float = NORM_EPS) -> jax.Array:
  """Per-utterance, per-bin (x - mean) / sqrt(var + eps) over valid frames, with the unbiased
  (n - 1) variance as SeamlessM4TFeatureExtractor; padded frames become 0."""
  w = mask_bt[..., None].astype(jnp.float32)
  count = w.sum(1, keepdims=True)
  mean = (features_btf * w).sum(1, keepdims=True) / jnp.maximum(count, 1.0)
  var = (jnp.square(features_btf - mean) * w).sum(1, keepdims=True) / jnp.maximum(count - 1, 1.0)
  return jnp.where(mask_bt[..., None], (features_btf - mean) * jax.lax.rsqrt(var + eps), 0.0)
