"""Features on device: log-mel against an independent NumPy reference, normalisation, SpecAugment."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from tpa_jax import config as config_lib
from tpa_jax.audio import featurizer as features


def reference_log_mel(audio: np.ndarray, *, sr=16000, win=400, hop=160, n_fft=512, mels=40,
                      low=20.0, high=8000.0, preemphasis=0.97, floor=1e-8) -> np.ndarray:
  """Log-mel filterbanks written out loop by loop, in float64: frames, per-frame pre-emphasis,
  periodic Hann, power spectrum, HTK-mel triangles (Slaney's formulas, not tpa_jax's)."""
  x = audio.astype(np.float64) / 32768.0
  window = scipy.signal.get_window('hann', win, fftbins=True)
  mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # = 2595 log10(1 + f/700)
  inv = lambda m: 700.0 * (np.exp(m / 1127.0) - 1.0)
  points = inv(np.linspace(mel(low), mel(high), mels + 2))
  freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
  bank = np.zeros((mels, len(freqs)))
  for m in range(mels):
    left, centre, right = points[m], points[m + 1], points[m + 2]
    for k, f in enumerate(freqs):
      if left < f <= centre:
        bank[m, k] = (f - left) / (centre - left)
      elif centre < f < right:
        bank[m, k] = (right - f) / (right - centre)
  out = []
  for start in range(0, len(x) - win + 1, hop):
    frame = x[start:start + win].copy()
    frame[1:] -= preemphasis * x[start:start + win - 1]
    frame[0] -= preemphasis * x[start]
    power = np.abs(np.fft.rfft(frame * window, n_fft)) ** 2
    out.append(np.log(np.maximum(bank @ power, floor)))
  return np.array(out)


def test_log_mel_matches_numpy_reference():
  rng = np.random.default_rng(0)
  t = np.arange(8000) / 16000
  tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t)
  audio = np.round((tone + 0.01 * rng.normal(size=t.shape)) * 32767).astype(np.int16)
  got, mask = features.log_mel(jnp.asarray(audio[None]), jnp.array([8000]), num_mels=40)
  want = reference_log_mel(audio)
  assert got.shape == (1, want.shape[0], 40)
  assert bool(mask.all())
  np.testing.assert_allclose(np.asarray(got[0]), want, atol=2e-3, rtol=1e-4)


def test_log_mel_frames_and_padding_invariance():
  rng = np.random.default_rng(1)
  audio = rng.integers(-3000, 3000, (2, 4000)).astype(np.int16)
  audio[1, 2500:] = 0  # utterance 1 has 2500 valid samples
  feats, mask = features.log_mel(jnp.asarray(audio), jnp.array([4000, 2500]))
  f = features.Featurizer()
  assert mask.sum(-1).tolist() == [f.frames(4000), f.frames(2500)] == [23, 14]
  # Valid frames of a padded utterance equal those of the utterance alone.
  alone, _ = features.log_mel(jnp.asarray(audio[1:, :2500]), jnp.array([2500]))
  np.testing.assert_allclose(feats[1, :14], alone[0], atol=1e-5)


def test_normalize_per_utterance_over_valid_frames():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(3.0, 2.0, (2, 20, 8)).astype(np.float32))
  mask = jnp.arange(20)[None, :] < jnp.array([[20], [12]])
  y = np.asarray(features.normalize(x, mask))
  for b, n in enumerate([20, 12]):
    np.testing.assert_allclose(y[b, :n].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y[b, :n].std(0), 1.0, atol=1e-3)
    assert (y[b, n:] == 0).all()


def test_spec_augment_masks_bands_and_spans_only():
  x = jnp.ones((4, 200, 40))
  mask = jnp.arange(200)[None, :] < jnp.array([[200], [150], [100], [60]])
  kw = dict(num_freq_masks=2, max_freq_width=6, num_time_masks=2, max_time_fraction=0.1,
            max_time_width=15)
  y = np.asarray(features.spec_augment(jax.random.key(0), x, mask, **kw))
  assert set(np.unique(y)) <= {0.0, 1.0}
  assert (y == 0).any()
  for b, n in enumerate([200, 150, 100, 60]):
    zero = y[b] == 0
    full_cols = zero.all(0)  # frequency bands: zero over all frames
    assert full_cols.sum() <= 2 * 6
    rows = zero[:, ~full_cols].all(1) if (~full_cols).any() else zero.all(1)
    # Time spans: at most 2 x min(15, 10% of the length) frames, all inside the utterance.
    assert rows.sum() <= 2 * min(15, int(0.1 * n))
    assert not rows[n:].any()
  np.testing.assert_array_equal(
      y, np.asarray(features.spec_augment(jax.random.key(0), x, mask, **kw)))
  assert not np.array_equal(
      y, np.asarray(features.spec_augment(jax.random.key(1), x, mask, **kw)))


def test_featurizer_augments_only_with_a_key():
  rng = np.random.default_rng(3)
  audio = jnp.asarray(rng.integers(-3000, 3000, (2, 16000)).astype(np.int16))
  lengths = jnp.array([16000, 12000])
  f = features.Featurizer(num_mels=40, max_freq_width=10)
  clean, mask = f(audio, lengths)
  again, _ = f(audio, lengths)
  np.testing.assert_array_equal(clean, again)
  augmented, _ = f(audio, lengths, jax.random.key(0))
  changed = np.asarray(augmented != clean)
  assert changed.any() and (np.asarray(augmented)[changed] == 0).all()


@pytest.mark.parametrize('field,value,message', [
    ('hop_ms', 0.0, 'features.hop_ms=0.0 must be positive'),
    ('num_bins', 40, "unknown features field(s) ['num_bins']"),
])
def test_featurizer_config_errors_are_named(field, value, message):
  c = config_lib.base_config().features
  c[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    features.Featurizer.from_config(c)
