"""Audio utilities in NumPy: resampling, trimming, additive noise at an SNR, WAV bytes."""

from __future__ import annotations

import functools
import io
import math
import wave

import numpy as np


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Polyphase resampling with an anti-aliasing filter (float in, float32 out)."""
  if rate_in == rate_out or audio.size == 0:
    return audio.astype(np.float32)
  # Imported here: scipy.signal takes seconds to load (4.5 s on 2 cores), and only synthesising
  # or resampling audio needs it, not every program that imports the data package.
  import scipy.signal  # pylint: disable=import-outside-toplevel
  g = math.gcd(rate_in, rate_out)
  up, down = rate_out // g, rate_in // g
  return scipy.signal.resample_poly(audio.astype(np.float64), up, down,
                                    window=_lowpass(up, down)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _lowpass(up: int, down: int) -> np.ndarray:
  """The filter `resample_poly` designs by default (Kaiser, beta 5, cutoff at the lower Nyquist),
  designed once per rate pair instead of once per call (half the cost of resampling a short
  utterance). `resample_poly` copies it before scaling."""
  import scipy.signal  # pylint: disable=import-outside-toplevel
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


class AudioError(ValueError):
  """Audio that cannot be used, with what is wrong and what is accepted."""


def decode_wav(data: bytes, sample_rate_hz: int) -> np.ndarray:
  """The int16 samples of a WAV file's bytes: 16-bit PCM, one channel, at `sample_rate_hz`;
  anything else raises AudioError naming what is wrong and what is accepted."""
  accepted = f'accepted: a WAV file of 16-bit PCM, one channel, {sample_rate_hz} Hz'
  try:
    with wave.open(io.BytesIO(data), 'rb') as f:
      width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
      frames = f.readframes(f.getnframes())
  except (wave.Error, EOFError) as e:
    raise AudioError(f'not a PCM WAV file ({e}); {accepted}') from e
  if width != 2:
    raise AudioError(f'{8 * width}-bit samples; {accepted}')
  if channels != 1:
    raise AudioError(f'{channels} channels; {accepted}')
  if rate != sample_rate_hz:
    raise AudioError(f'sampled at {rate} Hz; {accepted}')
  if not frames:
    raise AudioError(f'no samples; {accepted}')
  if len(frames) % 2:
    raise AudioError(f'a truncated file (an odd number of data bytes); {accepted}')
  return np.frombuffer(frames, '<i2').copy()


def encode_wav(samples: np.ndarray, sample_rate_hz: int) -> bytes:
  """The bytes of a one-channel 16-bit PCM WAV file of `samples` (int16)."""
  out = io.BytesIO()
  with wave.open(out, 'wb') as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(sample_rate_hz)
    f.writeframes(np.asarray(samples, '<i2').tobytes())
  return out.getvalue()
