"""Audio utilities in NumPy: resampling, trimming, additive noise at an SNR."""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.signal


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Polyphase resampling with an anti-aliasing filter (float in, float32 out)."""
  if rate_in == rate_out or audio.size == 0:
    return audio.astype(np.float32)
  g = math.gcd(rate_in, rate_out)
  up, down = rate_out // g, rate_in // g
  return scipy.signal.resample_poly(audio.astype(np.float64), up, down,
                                    window=_lowpass(up, down)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _lowpass(up: int, down: int) -> np.ndarray:
  """The filter `resample_poly` designs by default (Kaiser, beta 5, cutoff at the lower Nyquist),
  designed once per rate pair instead of once per call (half the cost of resampling a short
  utterance). `resample_poly` copies it before scaling."""
  max_rate = max(up, down)
  return scipy.signal.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=('kaiser', 5.0))


def trim_silence(audio: np.ndarray, threshold: float = 1e-3, margin: int = 800) -> np.ndarray:
  """Drops leading and trailing samples quieter than `threshold` (keeping a `margin`)."""
  loud = np.flatnonzero(np.abs(audio) > threshold)
  if loud.size == 0:
    return audio[:0]
  return audio[max(loud[0] - margin, 0):loud[-1] + margin + 1]


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
  """White Gaussian noise at `snr_db` relative to the signal's mean power."""
  power = float(np.mean(np.square(audio))) if audio.size else 0.0
  noise = rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)) if power > 0 else 0.0,
                     audio.shape)
  return (audio + noise).astype(np.float32)


def to_int16(audio: np.ndarray) -> np.ndarray:
  """Float audio in [-1, 1] to int16, clipping what lies outside."""
  return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
