"""A learnable synthetic task for smoke runs and tests: tokens rendered as spectral bands.

Each utterance is a random token sequence; token k occupies a few frames in which mel bins of
band k are raised above Gaussian noise. A model can learn to read the tokens back (CTC) or the
utterance's class (the token that occurs most). Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np


def ctc_batch(rng: np.random.Generator, *, batch_size: int, num_frames: int, input_dim: int,
              vocab_size: int, num_labels: int, frames_per_token: int = 8,
              min_fraction: float = 0.6) -> dict[str, np.ndarray]:
  """A padded batch: features [B, T, F] float32, feature_mask [B, T], labels [B, U] int32
  (ids 1..vocab_size-1), label_mask [B, U]. Utterances have random valid lengths."""
  num_tokens = vocab_size - 1
  band = max(input_dim // num_tokens, 1)
  features = rng.normal(0.0, 1.0, (batch_size, num_frames, input_dim)).astype(np.float32)
  feature_mask = np.zeros((batch_size, num_frames), bool)
  labels = np.zeros((batch_size, num_labels), np.int32)
  label_mask = np.zeros((batch_size, num_labels), bool)
  max_tokens = min(num_labels, num_frames // frames_per_token)
  for b in range(batch_size):
    n = int(rng.integers(max(1, int(min_fraction * max_tokens)), max_tokens + 1))
    tokens = rng.integers(1, vocab_size, n)
    for i, tok in enumerate(tokens):
      lo = ((tok - 1) * band) % input_dim
      features[b, i * frames_per_token:(i + 1) * frames_per_token, lo:lo + band] += 3.0
    length = n * frames_per_token
    features[b, length:] = 0.0
    feature_mask[b, :length] = True
    labels[b, :n] = tokens
    label_mask[b, :n] = True
  return dict(features=features, feature_mask=feature_mask, labels=labels, label_mask=label_mask)


def classification_batch(rng: np.random.Generator, *, batch_size: int, num_frames: int,
                         input_dim: int, num_classes: int) -> dict[str, np.ndarray]:
  """Utterances whose class c raises mel band c over all valid frames; labels [B] int32."""
  band = max(input_dim // num_classes, 1)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  features = rng.normal(0.0, 1.0, (batch_size, num_frames, input_dim)).astype(np.float32)
  lengths = rng.integers(num_frames // 2, num_frames + 1, batch_size)
  feature_mask = np.arange(num_frames)[None, :] < lengths[:, None]
  for b, c in enumerate(labels):
    features[b, :, c * band:(c + 1) * band] += 1.5
  features[~feature_mask] = 0.0
  return dict(features=features, feature_mask=feature_mask, labels=labels)
