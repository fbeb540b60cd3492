"""The front ends of imported encoders against transformers' extractors: w2v-BERT 2.0's (Kaldi
fbank, per-bin normalisation, stride-2 stacking and mask) against SeamlessM4TFeatureExtractor,
FastConformer's (NeMo log-mel) against ParakeetFeatureExtractor."""

import jax
import numpy as np
import pytest

from tpa_jax import config as config_lib
from tpa_jax.audio import featurizer as features
from tpa_jax.nn.frontend import stack_frames

transformers = pytest.importorskip(
    'transformers', reason='the parity extra (torch, transformers) is not installed')
pytest.importorskip('torch', reason='the parity extra (torch, transformers) is not installed')

# The w2v-BERT features config (configs/w2v_bert.py): only kind and floor differ from the default.
W2V_BERT_FEATURES = dict(kind='kaldi_fbank', floor=1.1920929e-07, spec_augment=False)


def _reference(utterances):
  extractor = transformers.SeamlessM4TFeatureExtractor()
  out = extractor(utterances, sampling_rate=16000, return_tensors='np', padding=True)
  return out['input_features'], out['attention_mask'].astype(bool)


def _ours(utterances):
  featurizer = features.Featurizer(**W2V_BERT_FEATURES)
  feats, mask = jax.jit(featurizer)(*padded(utterances))
  return stack_frames(feats, mask, 2)


def speech_like(rng, lengths):
  """A few tones with a slow envelope over noise, in [-1, 1]."""
  utterances = []
  for n in lengths:
    t = np.arange(n) / 16000
    tones = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(80, 4000, 4))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    utterances.append((0.1 * envelope * tones + 0.02 * rng.normal(size=n)).astype(np.float32))
  return utterances


def padded(utterances):
  lengths = np.array([len(u) for u in utterances])
  audio = np.zeros((len(utterances), lengths.max()), np.float32)
  for i, u in enumerate(utterances):
    audio[i, :len(u)] = u
  return audio, lengths


@pytest.mark.parametrize('lengths', [(16000, 12345), (8001, 24160, 4000)])
def test_kaldi_fbank_matches_seamless_m4t_extractor(lengths):
  """Odd and even frame counts, padded batches: features on valid stacked frames within 1e-3,
  the same valid-frame mask."""
  utterances = speech_like(np.random.default_rng(len(lengths)), lengths)
  want, want_mask = _reference(utterances)
  got, got_mask = map(np.asarray, _ours(utterances))
  frames = [(n - 400) // 160 + 1 for n in lengths]
  assert {f % 2 for f in frames} == {0, 1}  # both parities are exercised
  # The reference pads frames to an even count; the stacked frame it adds is padding.
  t = got.shape[1]
  assert not want_mask[:, t:].any()
  np.testing.assert_array_equal(got_mask, want_mask[:, :t])
  np.testing.assert_array_equal(got_mask.sum(1), [f // 2 for f in frames])
  diff = np.abs(got - want[:, :t])[got_mask]
  assert diff.max() <= 1e-3, diff.max()
  assert np.abs(want[:, :t][got_mask]).max() > 1.0  # normalised features, not all zero


def test_nemo_log_mel_matches_parakeet_extractor():
  """FastConformer's front end on a padded batch of odd and even lengths: the same valid-frame
  mask, features within 1e-3; padding (noise here) is never read."""
  lengths = (16000, 12345, 8001)
  utterances = speech_like(np.random.default_rng(7), lengths)
  extractor = transformers.ParakeetFeatureExtractor()
  out = extractor(utterances, sampling_rate=16000, return_tensors='np')
  want, want_mask = out['input_features'], out['attention_mask'].astype(bool)
  audio, n = padded(utterances)
  audio = np.where(np.arange(audio.shape[1]) < n[:, None], audio,
                   np.random.default_rng(0).normal(size=audio.shape)).astype(np.float32)
  featurizer = features.Featurizer(kind='nemo_log_mel', floor=2.0 ** -24, spec_augment=False)
  got, got_mask = map(np.asarray, jax.jit(featurizer)(audio, n))
  assert got.shape == want.shape
  np.testing.assert_array_equal(got_mask, want_mask)
  np.testing.assert_array_equal(got_mask.sum(1), [featurizer.frames(k) for k in lengths])
  diff = np.abs(got - want)[got_mask]
  assert diff.max() <= 1e-3, diff.max()
  assert np.abs(want[got_mask]).max() > 1.0


def test_kaldi_fbank_config_and_bad_kind():
  config = config_lib.base_config()
  config.features.update(W2V_BERT_FEATURES)
  featurizer = features.Featurizer.from_config(config.features)
  assert featurizer.kind == 'kaldi_fbank' and featurizer.frames(16000) == 98
  config.features.kind = 'mfcc'
  with pytest.raises(ValueError, match=r"features.kind='mfcc': accepted values are "
                                       r"\('log_mel', 'kaldi_fbank', 'nemo_log_mel'\)"):
    features.Featurizer.from_config(config.features)
