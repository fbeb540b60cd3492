"""The featurizer of a config: audio batch -> (features, mask) inside the jitted step, with
SpecAugment in training; and the encoder frames an utterance yields."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import ml_collections

from tpa_jax.audio import imported
from tpa_jax.audio.log_mel import log_mel, normalize
from tpa_jax.audio.spec_augment import spec_augment
from tpa_jax.errors import ConfigError

# features.kind: log_mel.py's log-mel, the Kaldi-compatible fbank of w2v-BERT 2.0, or NeMo's
# log-mel of FastConformer (imported.py).
KINDS = ('log_mel', 'kaldi_fbank', 'nemo_log_mel')


@dataclasses.dataclass(frozen=True)
class Featurizer:
  """Audio batch -> (features [B, T, num_mels], mask [B, T]) inside the jitted step.

  Built from `config.features` by `from_config`. SpecAugment is applied only when a random key
  is given (training). kind='kaldi_fbank' computes `imported.kaldi_fbank` with the same window, hop,
  bins, pre-emphasis and floor, normalised as w2v-BERT 2.0's feature extractor does;
  kind='nemo_log_mel' `imported.nemo_log_mel` (`floor` is its log guard), normalised as NeMo does.
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
      raise ConfigError(f'features.kind={featurizer.kind!r}: accepted values are {KINDS}')
    for name in ('window_ms', 'hop_ms', 'num_mels', 'sample_rate_hz'):
      if getattr(featurizer, name) <= 0:
        raise ConfigError(f'features.{name}={getattr(featurizer, name)} must be positive')
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
      features, mask = imported.kaldi_fbank(audio_bs, lengths_b, **kw)
      features = imported.normalize_unbiased(features, mask)
    elif self.kind == 'nemo_log_mel':
      features, mask = imported.nemo_log_mel(audio_bs, lengths_b, **kw)
      features = imported.normalize_nemo(features, mask)
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


def featurizer(config: ml_collections.ConfigDict) -> Featurizer:
  """The featurizer of `config.features`, checked against the frontend's input size."""
  f = Featurizer.from_config(config.features)
  if f.num_mels != config.model.frontend.input_dim:
    raise ConfigError(f'features.num_mels={f.num_mels} must equal model.frontend.input_dim='
                     f'{config.model.frontend.input_dim}')
  return f


def output_frames(config: ml_collections.ConfigDict) -> Callable[[int], int]:
  """num_samples -> encoder output frames, for the featurizer and frontend of `config`."""
  f = featurizer(config)
  fe = config.model.frontend
  if fe.kind == 'stacked':
    return lambda n: f.frames(n) // fe.stack

  def conv(n):
    t = f.frames(n)
    for _ in range(fe.num_layers):
      t = max((t - fe.kernel_size) // fe.stride + 1, 0)
    return t
  return conv
