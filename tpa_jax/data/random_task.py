"""A learnable synthetic task for smoke runs and tests: tokens rendered as spectral bands.

Each utterance is a random token sequence; token k occupies a few frames in which mel bins of
band k are raised above Gaussian noise. A model can learn to read the tokens back (CTC) or the
utterance's class (the token that occurs most). Deterministic for a seed.
"""

from __future__ import annotations

import jax
import ml_collections
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


class RandomBatches:
  """The synthetic learnable task of `tpa_jax.synthetic`, shaped by `config.data`: global batch
  `s` is a function of (seed, s) alone, so the position (`get_state`) is the next batch's index.
  Process p of P yields rows [p·B/P, (p+1)·B/P) of each global batch of B rows."""

  def __init__(self, config: ml_collections.ConfigDict, seed: int, *,
               process_index: int | None = None, process_count: int | None = None):
    self.config, self.seed, self.next_index = config, seed, 0
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if config.train.batch_size % self.process_count:
      raise ValueError(f'train.batch_size={config.train.batch_size} does not divide over '
                       f'{self.process_count} processes; use a multiple of {self.process_count}')

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = random_batch(self.config, np.random.default_rng([self.seed, self.next_index]),
                         self.config.train.batch_size)
    self.next_index += 1
    per = self.config.train.batch_size // self.process_count
    rows = slice(self.process_index * per, (self.process_index + 1) * per)
    return {k: v[rows] for k, v in batch.items()}

  def get_state(self) -> dict:
    return {'next_index': self.next_index}

  def set_state(self, state: dict) -> None:
    self.next_index = int(state['next_index'])


def random_batch(config: ml_collections.ConfigDict, rng: np.random.Generator,
                 batch_size: int) -> dict:
  """One whole batch of the synthetic task of `config.head.kind`."""
  c = config
  kw = dict(batch_size=batch_size, num_frames=c.data.num_frames,
            input_dim=c.model.frontend.input_dim)
  if c.head.kind == 'ctc':
    return ctc_batch(rng, vocab_size=c.head.vocab_size,
                               num_labels=c.data.num_labels, **kw)
  return classification_batch(rng, num_classes=c.head.num_classes, **kw)


# The random task's evaluation set: this many batches of `data.eval_batch_size` utterances.
RANDOM_EVAL_BATCHES = 4


class TokenIds:
  """A CTC 'tokenizer' for the random task: token ids written as words ('3 1 4')."""

  def decode(self, ids) -> str:
    return ' '.join(str(int(i)) for i in ids)


def random_eval_batches(config: ml_collections.ConfigDict, data_ways: int):
  """(batch, references) of the random task's evaluation set: every process gets every row (as
  `scoring.Evaluator` expects); references are the label ids as words (CTC) or None."""
  size = -(-config.data.eval_batch_size // data_ways) * data_ways
  for i in range(RANDOM_EVAL_BATCHES):
    # A third seed word keeps these batches apart from the training stream [seed, step].
    batch = random_batch(config, np.random.default_rng([config.seed, i, 1]), size)
    batch['weight'] = np.ones((size,), np.float32)
    refs = None
    if config.head.kind == 'ctc':
      refs = [TokenIds().decode(labels[mask])
              for labels, mask in zip(batch['labels'], batch['label_mask'])]
    yield batch, refs
