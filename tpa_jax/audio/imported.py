"""Filterbank front ends of imported encoders, in JAX.

`kaldi_fbank` is w2v-BERT 2.0's (SeamlessM4TFeatureExtractor). Per frame (25 ms window, 10 ms
hop, no centring): the DC offset is removed, pre-emphasis is applied (the first sample is scaled
by 1 - coefficient), the Povey window (Hann to the power 0.85) weights the samples, and the power
spectrum (512-point FFT) is pooled by triangular filters that are triangles on the Kaldi mel
scale (1127·ln(1 + f/700)), 20 Hz to Nyquist. Audio is in 16-bit sample units. Log energies are
normalised per bin over the utterance with the unbiased variance.

`nemo_log_mel` is FastConformer's (NeMo's, ParakeetFeatureExtractor): pre-emphasis over the
whole utterance, centred frames (the signal zero-padded by n_fft/2 on both sides), a symmetric
Hann window centred in the FFT, Slaney-normalised filters on the Slaney mel scale from 0 Hz,
log(energy + 2^-24), per-bin normalisation (x - mean) / (std + 1e-5) with the unbiased std.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Normalisation epsilons: SeamlessM4TFeatureExtractor adds it to the unbiased variance,
# ParakeetFeatureExtractor to the unbiased standard deviation.
NORM_EPS = 1e-7
NEMO_NORM_EPS = 1e-5


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


def slaney_mel(hz):
  """Slaney's mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, np.float64)
  log_step = np.log(6.4) / 27.0
  return np.where(hz < 1000.0, 3.0 * hz / 200.0,
                  15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step)


def slaney_mel_to_hz(mel):
  mel = np.asarray(mel, np.float64)
  log_step = np.log(6.4) / 27.0
  return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


@functools.lru_cache(maxsize=16)
def slaney_mel_filterbank(num_mels: int, n_fft: int, sample_rate_hz: int, low_hz: float,
                          high_hz: float) -> np.ndarray:
  """Filters [n_fft//2 + 1, num_mels]: triangles in Hz between edges equally spaced on the
  Slaney mel scale, each scaled to unit area (2 / its width in Hz)."""
  bins_hz = np.linspace(0, sample_rate_hz // 2, n_fft // 2 + 1)
  edges = slaney_mel_to_hz(np.linspace(slaney_mel(low_hz), slaney_mel(high_hz), num_mels + 2))
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins_hz[:, None] - lower) / (center - lower)
  falling = (upper - bins_hz[:, None]) / (upper - center)
  bank = np.maximum(0.0, np.minimum(rising, falling))
  return (bank * (2.0 / (upper - lower))).astype(np.float32)


def nemo_log_mel(audio_bs: jax.Array, lengths_b: jax.Array, *, sample_rate_hz: int = 16000,
                 window_ms: float = 25.0, hop_ms: float = 10.0, num_mels: int = 80,
                 n_fft: int | None = None, preemphasis: float = 0.97,
                 floor: float = 2.0 ** -24) -> tuple[jax.Array, jax.Array]:
  """NeMo's log-mel features [B, 1 + S // hop, num_mels] (float32) and frame mask
  (`lengths // hop` valid frames). `audio_bs` is int16 (scaled to [-1, 1]) or float; samples
  past `lengths_b` are zeroed first, so valid frames never read padding. `floor` is the guard
  added before the log."""
  window = int(round(sample_rate_hz * window_ms / 1000))
  hop = int(round(sample_rate_hz * hop_ms / 1000))
  n_fft = n_fft or 1 << (window - 1).bit_length()
  x = audio_bs.astype(jnp.float32)
  if jnp.issubdtype(audio_bs.dtype, jnp.integer):
    x = x / 32768.0
  valid = jnp.arange(x.shape[1])[None, :] < lengths_b[:, None]
  x = jnp.where(valid, x, 0.0)
  if preemphasis:
    x = jnp.concatenate([x[:, :1], x[:, 1:] - preemphasis * x[:, :-1]], axis=1)
    x = jnp.where(valid, x, 0.0)
  x = jnp.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)))
  t = 1 + audio_bs.shape[1] // hop
  index = jnp.arange(t)[:, None] * hop + jnp.arange(n_fft)[None, :]
  offset = (n_fft - window) // 2  # the window sits in the middle of the FFT frame
  window_n = np.zeros(n_fft, np.float32)
  window_n[offset:offset + window] = np.hanning(window)
  spectrum = jnp.fft.rfft(x[:, index] * window_n, n=n_fft)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  mel = power @ slaney_mel_filterbank(num_mels, n_fft, sample_rate_hz, 0.0, sample_rate_hz / 2)
  mask = jnp.arange(t)[None, :] < (lengths_b // hop)[:, None]
  return jnp.log(mel + floor), mask


def normalize_nemo(features_btf: jax.Array, mask_bt: jax.Array,
                   eps: float = NEMO_NORM_EPS) -> jax.Array:
  """Per-utterance, per-bin (x - mean) / (std + eps) over valid frames with the unbiased std,
  as ParakeetFeatureExtractor; padded frames become 0."""
  w = mask_bt[..., None].astype(jnp.float32)
  count = w.sum(1, keepdims=True)
  mean = (features_btf * w).sum(1, keepdims=True) / jnp.maximum(count, 1.0)
  var = (jnp.square(features_btf - mean) * w).sum(1, keepdims=True) / jnp.maximum(count - 1, 1.0)
  return jnp.where(mask_bt[..., None], (features_btf - mean) / (jnp.sqrt(var) + eps), 0.0)
