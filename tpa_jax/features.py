"""Features on device: log-mel filterbanks, per-utterance normalisation and SpecAugment in JAX."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tpa_jax import fbank

# features.kind: this module's log-mel, the Kaldi-compatible fbank of w2v-BERT 2.0, or NeMo's
# log-mel of FastConformer (tpa_jax/fbank.py).
KINDS = ('log_mel', 'kaldi_fbank', 'nemo_log_mel')


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


@dataclasses.dataclass(frozen=True)
class Featurizer:
  """Audio batch -> (features [B, T, num_mels], mask [B, T]) inside the jitted step.

  Built from `config.features` by `from_config`. SpecAugment is applied only when a random key
  is given (training). kind='kaldi_fbank' computes `fbank.kaldi_fbank` with the same window, hop,
  bins, pre-emphasis and floor, normalised as w2v-BERT 2.0's feature extractor does;
  kind='nemo_log_mel' `fbank.nemo_log_mel` (`floor` is its log guard), normalised as NeMo does.
  """
  kind: str = 'log_mel'
  sample_rate_hz: int = 16000
  window_ms: float = 25.0
  hop_ms: float = 10.0
  num_mels: int = 80
  preemphasis: float = 0.97
  floor: float = 1e-8
  spec_augment: bool = True
  num_freq_masks: int = 2
  max_freq_width: int = 15
  num_time_masks: int = 2
  max_time_fraction: float = 0.05
  max_time_width: int = 40

  @classmethod
  def from_config(cls, c) -> 'Featurizer':
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(c) - fields)
    if unknown:
      raise ValueError(f'unknown features field(s) {unknown}; accepted: {sorted(fields)}')
    featurizer = cls(**dict(c))
    if featurizer.kind not in KINDS:
      raise ValueError(f'features.kind={featurizer.kind!r}: accepted values are {KINDS}')
    for name in ('window_ms', 'hop_ms', 'num_mels', 'sample_rate_hz'):
      if getattr(featurizer, name) <= 0:
        raise ValueError(f'features.{name}={getattr(featurizer, name)} must be positive')
    return featurizer

  @property
  def hop(self) -> int:
    return int(round(self.sample_rate_hz * self.hop_ms / 1000))

  @property
  def window(self) -> int:
    return int(round(self.sample_rate_hz * self.window_ms / 1000))

  def frames(self, num_samples: int) -> int:
    """Feature frames of an utterance of `num_samples` samples."""
    if self.kind == 'nemo_log_mel':  # centred frames
      return num_samples // self.hop
    return max((num_samples - self.window) // self.hop + 1, 0)

  def __call__(self, audio_bs: jax.Array, lengths_b: jax.Array,
               key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    kw = dict(sample_rate_hz=self.sample_rate_hz, window_ms=self.window_ms, hop_ms=self.hop_ms,
              num_mels=self.num_mels, preemphasis=self.preemphasis, floor=self.floor)
    if self.kind == 'kaldi_fbank':
      features, mask = fbank.kaldi_fbank(audio_bs, lengths_b, **kw)
      features = fbank.normalize_unbiased(features, mask)
    elif self.kind == 'nemo_log_mel':
      features, mask = fbank.nemo_log_mel(audio_bs, lengths_b, **kw)
      features = fbank.normalize_nemo(features, mask)
    else:
      features, mask = log_mel(audio_bs, lengths_b, **kw)
      features = normalize(features, mask)
    if key is not None and self.spec_augment:
      features = spec_augment(key, features, mask, num_freq_masks=self.num_freq_masks,
                              max_freq_width=self.max_freq_width,
                              num_time_masks=self.num_time_masks,
                              max_time_fraction=self.max_time_fraction,
                              max_time_width=self.max_time_width)
    return features, mask
