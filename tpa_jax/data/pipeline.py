"""The input pipeline: validated example index, length buckets, deterministic batch plans, grain.

Every process reads its own rows of each global batch, so all processes yield the same number of
batches. Batch shapes come from a small fixed set of buckets (max samples x batch size), so a run
compiles a few programs and then never recompiles. The iterator is deterministic for a seed and
its position (a grain iterator state) can be saved and restored.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Callable, Sequence

import grain
import numpy as np
from absl import logging

# Why an example was skipped; the counts are logged and stored with the run.
SKIP_REASONS = ('unreadable', 'empty_audio', 'non_finite_audio', 'silent_audio', 'too_long',
                'empty_transcript', 'too_many_tokens')


@dataclasses.dataclass(frozen=True)
class Bucket:
  """Utterances of at most `max_samples` samples, `batch_size` of them per global batch."""
  max_samples: int
  batch_size: int


def make_buckets(max_seconds: Sequence[float], batch_seconds: float, *, sample_rate_hz: int,
                 multiple_of: int) -> tuple[Bucket, ...]:
  """Buckets holding about `batch_seconds` of audio per batch; batch sizes are multiples of
  `multiple_of` (the data-parallel ways)."""
  if list(max_seconds) != sorted(set(max_seconds)) or not max_seconds:
    raise ValueError(f'data.bucket_seconds={tuple(max_seconds)} must be increasing and non-empty')
  buckets = []
  for s in max_seconds:
    size = max(int(batch_seconds / s) // multiple_of, 1) * multiple_of
    buckets.append(Bucket(int(round(s * sample_rate_hz)), size))
  return tuple(buckets)


@dataclasses.dataclass
class SplitIndex:
  """Lengths of the usable examples of a split and what was skipped, by reason."""
  num_samples: np.ndarray  # int64 [N]; 0 for skipped examples
  keep: np.ndarray  # bool [N]
  skipped: dict[str, int]

  def save(self, path: str) -> None:
    tmp = path + '.tmp.npz'
    np.savez(tmp, num_samples=self.num_samples, keep=self.keep,
             skipped=json.dumps(self.skipped))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> 'SplitIndex':
    with np.load(path) as f:
      return cls(f['num_samples'], f['keep'], json.loads(str(f['skipped'])))


def audio_problem(audio: np.ndarray, *, max_samples: int, silence: float = 1e-3) -> str | None:
  """The skip reason for an utterance's audio, or None if it is usable."""
  if audio.ndim != 1 or audio.size == 0:
    return 'empty_audio'
  if np.issubdtype(audio.dtype, np.floating):
    if not np.all(np.isfinite(audio)):
      return 'non_finite_audio'
    peak = float(np.max(np.abs(audio)))
  else:
    peak = float(np.max(np.abs(audio.astype(np.int32)))) / 32768.0
  if peak < silence:
    return 'silent_audio'
  if audio.size > max_samples:
    return 'too_long'
  return None


def scan_split(source, *, audio_key: str, max_samples: int,
               text_fn: Callable[[dict], str] | None = None,
               num_tokens: Callable[[str], int] | None = None,
               max_tokens: Callable[[int], int] | None = None, name: str = 'split') -> SplitIndex:
  """Reads every example once and records which are usable (with a counted warning for the
  rest): unreadable, empty, non-finite, silent or over-long audio; empty transcripts; more
  tokens than the model can emit for the audio (`max_tokens(num_samples)`)."""
  n = len(source)
  num_samples = np.zeros(n, np.int64)
  keep = np.zeros(n, bool)
  skipped: collections.Counter = collections.Counter()
  for i in range(n):
    try:
      example = source[i]
      audio = np.asarray(example[audio_key])
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s: example %d is unreadable (%s); skipped', name, i, e)
      skipped['unreadable'] += 1
      continue
    reason = audio_problem(audio, max_samples=max_samples)
    if reason is None and text_fn is not None:
      text = text_fn(example)
      if not text.strip():
        reason = 'empty_transcript'
      elif num_tokens is not None and max_tokens is not None and (
          num_tokens(text) > max_tokens(audio.size)):
        reason = 'too_many_tokens'
    if reason is not None:
      skipped[reason] += 1
      continue
    keep[i], num_samples[i] = True, audio.size
  if skipped:
    logging.warning('%s: skipped %d of %d examples: %s', name, sum(skipped.values()), n,
                    dict(skipped))
  return SplitIndex(num_samples, keep, dict(skipped))


def cached_scan(cache_dir: str, key: dict, scan: Callable[[], SplitIndex]) -> SplitIndex:
  """`scan()`, cached in `cache_dir` under a digest of `key` (dataset, split, limits, ...)."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f'index-{digest}.npz')
  if os.path.exists(path):
    return SplitIndex.load(path)
  index = scan()
  os.makedirs(cache_dir, exist_ok=True)
  index.save(path)
  return index


def epoch_plan(index: SplitIndex, buckets: Sequence[Bucket], *, seed: int, epoch: int,
               shuffle: bool = True) -> list[np.ndarray]:
  """The global batches (arrays of example indices) of one epoch. Every epoch has the same
  number of batches per bucket; leftovers that do not fill a batch wait for another epoch."""
  rng = np.random.default_rng([seed, epoch])
  batches = []
  lower = 0
  for bucket in buckets:
    members = np.flatnonzero(index.keep & (index.num_samples > lower) &
                             (index.num_samples <= bucket.max_samples))
    lower = bucket.max_samples
    if shuffle:
      members = rng.permutation(members)
    usable = len(members) // bucket.batch_size * bucket.batch_size
    batches += [members[i:i + bucket.batch_size] for i in range(0, usable, bucket.batch_size)]
  if shuffle:
    order = rng.permutation(len(batches))
    batches = [batches[i] for i in order]
  return batches


class BatchLoader:
  """Training batches for this process: a grain MapDataset over a deterministic plan.

  Batch `s` of the run is batch `s mod B` of epoch `s div B` (B batches per epoch); this
  process gets rows [p·b/P, (p+1)·b/P) of it.
  """

  def __init__(self, source, index: SplitIndex, buckets: Sequence[Bucket],
               collate: Callable[[list[dict], int], dict], *, seed: int, num_batches: int,
               process_index: int = 0, process_count: int = 1, num_threads: int = 2):
    for b in buckets:
      if b.batch_size % process_count:
        raise ValueError(f'batch size {b.batch_size} of bucket {b} does not divide over '
                         f'{process_count} processes')
    self.source, self.index, self.buckets = source, index, tuple(buckets)
    self.collate, self.seed = collate, seed
    self.process_index, self.process_count = process_index, process_count
    self.batches_per_epoch = len(epoch_plan(index, buckets, seed=seed, epoch=0))
    if self.batches_per_epoch == 0:
      raise ValueError('no bucket has enough usable examples for one batch; usable examples: '
                       f'{int(index.keep.sum())}, skipped: {index.skipped}')
    self._plans: dict[int, list[np.ndarray]] = {}
    self._num_threads = num_threads
    self.dataset = grain.MapDataset.range(num_batches).map(self.load)

  def global_indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.batches_per_epoch)
    plans = self._plans  # reader threads may swap it; each works on its own reference
    plan = plans.get(epoch)
    if plan is None:
      plan = epoch_plan(self.index, self.buckets, seed=self.seed, epoch=epoch)
      # Keep this epoch and the one before (threads straddle an epoch boundary).
      self._plans = {e: p for e, p in plans.items() if e == epoch - 1} | {epoch: plan}
    return plan[i]

  def local_indices(self, step: int) -> np.ndarray:
    rows = self.global_indices(step)
    per = len(rows) // self.process_count
    return rows[self.process_index * per:(self.process_index + 1) * per]

  def load(self, step: int) -> dict:
    rows = self.local_indices(step)
    max_samples = max(int(self.index.num_samples[r]) for r in rows)
    bucket = next(b for b in self.buckets if b.max_samples >= max_samples)
    return self.collate([self.source[int(r)] for r in rows], bucket.max_samples)

  def __iter__(self):
    return iter(self.dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=2)))


def eval_batches(source, index: SplitIndex, buckets: Sequence[Bucket],
                 collate: Callable[[list[dict], int], dict], *, batch_size: int,
                 text_fn: Callable[[dict], str] | None = None):
  """Every usable example once, in length order, as (batch, texts): batches are padded to
  `batch_size` rows (padded rows have `weight` 0) and to bucket lengths; `texts` are
  `text_fn` of the real rows."""
  rows = np.flatnonzero(index.keep)
  rows = rows[np.argsort(index.num_samples[rows], kind='stable')]
  for start in range(0, len(rows), batch_size):
    chunk = [int(r) for r in rows[start:start + batch_size]]
    longest = max(int(index.num_samples[r]) for r in chunk)
    bucket = next(b for b in buckets if b.max_samples >= longest)
    examples = [source[r] for r in chunk]
    batch = collate(examples + [examples[-1]] * (batch_size - len(chunk)), bucket.max_samples)
    batch['weight'] = (np.arange(batch_size) < len(chunk)).astype(np.float32)
    yield batch, [text_fn(ex) for ex in examples] if text_fn is not None else None
