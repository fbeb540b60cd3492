"""Speech datasets: TFDS builders (the synthetic corpus, LibriSpeech) -> validated, bucketed batches.

    data = SpeechData.open(config.data, workdir=..., featurizer=..., output_frames=...)
    data.prepare()                               # TFDS download_and_prepare (array_record)
    tokenizer = data.tokenizer(config.tokenizer, cache_dir)
    loader = data.train_loader(tokenizer, seed=0, num_batches=1000)   # grain, this process's rows
    for batch in data.eval_batches('test', tokenizer): ...

Batches hold int16 `audio` [B, S] and `audio_lengths` [B] (featurized on device), and the labels
of the task: CTC `labels` [B, L] + `label_mask`, or classification `labels` [B]. Every bucket has
a fixed (B, S, L), so a run compiles a few programs and then never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Callable

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from tpa_jax.audio.featurizer import output_frames
from tpa_jax.data import manifest, pipeline, speech_corpus
from tpa_jax.data import tokenizer as tokenizer_lib

FAMILIES = ('synthetic_speech', 'librispeech', 'manifest', 'mixture')
# Joins the datasets of a mixture in data.name ('synthetic_speech/source+manifest:DIR'): their
# audio read as one dataset, what self-supervised pre-training reads.
MIXTURE_SEPARATOR = '+'


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where a family of TFDS builders keeps what the pipeline needs."""
  audio_key: str
  text_key: str
  label_key: str | None  # a ClassLabel feature for utterance classification
  lowercase: bool  # LibriSpeech transcripts are upper case
  sample_rate_hz: int = 16000


SPECS = {
    'synthetic_speech': DatasetSpec('audio', 'transcript', 'language', lowercase=False),
    'librispeech': DatasetSpec('speech', 'text', None, lowercase=True),
    'manifest': DatasetSpec('audio', 'transcript', 'label', lowercase=False),
    # A mixture's examples hold the audio of their dataset only (`ConcatSource`).
    'mixture': DatasetSpec('audio', 'transcript', None, lowercase=False),
}
# data.text_normalization: applied alike to training text, references and decoder word counts.
TEXT_NORMALIZATIONS = ('none', 'lower', 'lower_no_punctuation')


def family(name: str) -> str:
  """'synthetic_speech', 'librispeech', 'manifest' (of 'manifest:DIR') or 'mixture' (of
  datasets joined by '+')."""
  if MIXTURE_SEPARATOR in name:
    return 'mixture'
  return 'manifest' if name.startswith('manifest:') else name.partition('/')[0]


class ConcatSource:
  """The examples of several TFDS data sources, one after the other, as one random-access
  source; each example holds its audio only, under 'audio' (the parts' audio features differ
  in name: LibriSpeech calls it 'speech')."""

  def __init__(self, sources, audio_keys: tuple[str, ...]):
    self.sources, self.audio_keys = tuple(sources), tuple(audio_keys)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i) -> dict:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f'example {i} of a mixture of {len(self)}')
    part = int(np.searchsorted(self.offsets, i, side='right')) - 1
    return {'audio': self.sources[part][i - int(self.offsets[part])][self.audio_keys[part]]}


@dataclasses.dataclass(frozen=True)
class _MixtureInfo:
  """The fields of a TFDS DatasetInfo that `SpeechData` reads, for a mixture."""
  full_name: str
  splits: dict
  features: dict


class MixedBuilder:
  """Several TFDS speech datasets as one builder (what `SpeechData` reads of one): each split is
  the concatenation of the parts' splits of that name, in the order given. Only their audio is
  read, so a mixture serves self-supervised pre-training (head.kind='best_rq') and nothing
  that reads transcripts or labels."""

  def __init__(self, names: list[str], builders: list[tfds.core.DatasetBuilder]):
    self.names, self.parts = tuple(names), tuple(builders)
    self.audio_keys = tuple(SPECS[family(n)].audio_key for n in names)
    rates = {SPECS[family(n)].sample_rate_hz for n in names}
    if len(rates) > 1:
      raise ValueError(f'data.name={MIXTURE_SEPARATOR.join(names)!r} mixes sample rates '
                       f'{sorted(rates)}; the datasets of a mixture share one')
    self.builder_config = tuple(b.builder_config for b in builders)

  @property
  def info(self):
    infos = [b.info for b in self.parts]
    splits = set(infos[0].splits or {})
    for i in infos[1:]:
      splits &= set(i.splits or {})
    return _MixtureInfo(full_name=MIXTURE_SEPARATOR.join(i.full_name for i in infos),
                        splits={s: None for s in sorted(splits)}, features={'audio': None})

  def download_and_prepare(self, **kwargs) -> None:
    for b in self.parts:
      b.download_and_prepare(**kwargs)

  def as_data_source(self, split: str) -> ConcatSource:
    return ConcatSource([b.as_data_source(split=split) for b in self.parts], self.audio_keys)



def normalize_text(text: str, how: str) -> str:
  if how == 'none':
    return text
  text = text.lower()
  if how == 'lower_no_punctuation':
    # Letters, digits, apostrophes inside words and spaces survive; the rest is a space.
    kept = ''.join(c if c.isalnum() or c in " '" else ' ' for c in text)
    text = ' '.join(w.strip("'") for w in kept.split() if w.strip("'"))
  return ' '.join(text.split())


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def open_builder(name: str, data_dir: str, domains_file: str = '', *,
                 max_seconds: float = 16.0) -> tfds.core.DatasetBuilder:
  """The TFDS builder `name` ('synthetic_speech/<domain>', 'librispeech[/config]' or
  'manifest:DIR'), writing array_record files under `data_dir`. `max_seconds`: the longest
  bucket (a manifest's longer lines are rejected when it is prepared). Names joined by '+' are
  a mixture (`MixedBuilder`) of those datasets."""
  if MIXTURE_SEPARATOR in name:
    names = name.split(MIXTURE_SEPARATOR)
    if '' in names or len(set(names)) < len(names):
      raise ValueError(f'data.name={name!r}: a mixture joins distinct dataset names with '
                       f"{MIXTURE_SEPARATOR!r} (none empty)")
    return MixedBuilder(names, [open_builder(n, data_dir, domains_file, max_seconds=max_seconds)
                                for n in names])
  if name.startswith('manifest:'):
    return manifest.open_builder(name, data_dir, max_seconds)
  family, _, config_name = name.partition('/')
  if family == 'synthetic_speech':
    domains = speech_corpus.all_domains(domains_file)
    if config_name not in domains:
      raise ValueError(f'data.name={name!r}: the synthetic corpus has domains {sorted(domains)}'
                       f'{" in " + domains_file if domains_file else ""}')
    return speech_corpus.SyntheticSpeech(config=domains[config_name], data_dir=data_dir,
                                         file_format='array_record')
  if family == 'librispeech':
    return tfds.builder(name, data_dir=data_dir, file_format='array_record')
  raise ValueError(f"data.name={name!r}: accepted values are 'random', "
                   "'synthetic_speech/<domain>', 'librispeech[/<config>]' or 'manifest:DIR'")


@dataclasses.dataclass
class SpeechData:
  """One TFDS speech dataset with its pipeline settings (`config.data`)."""
  builder: tfds.core.DatasetBuilder
  spec: DatasetSpec
  buckets: tuple[pipeline.Bucket, ...]
  task: str
  max_tokens_per_second: float
  eval_batch_size: int
  num_threads: int
  index_dir: str
  frames: Callable[[int], int]  # samples -> encoder output frames
  text_normalization: str = 'none'
  # split -> {reason: count} of the examples skipped by the indexes built so far.
  skipped: dict = dataclasses.field(default_factory=dict)
  _texts: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def open(cls, data_config, *, workdir: str, task: str, frames: Callable[[int], int],
           data_ways: int = 1) -> 'SpeechData':
    """`frames(num_samples)` is the number of frames the model emits for that much audio."""
    d = data_config
    data_dir = d.data_dir or os.path.join(workdir, 'data')
    builder = open_builder(d.name, data_dir, d.domains_file, max_seconds=max(d.bucket_seconds))
    spec = SPECS[family(d.name)]
    how = d.get('text_normalization', 'none')
    if how not in TEXT_NORMALIZATIONS:
      raise ValueError(f'data.text_normalization={how!r}: accepted values are '
                       f'{TEXT_NORMALIZATIONS}')
    features = list(builder.info.features.keys()) if builder.info.features else []
    if spec.audio_key not in features:
      raise ValueError(f'data.name={d.name!r} has no audio feature {spec.audio_key!r} (its '
                       f'features: {sorted(features)}); training reads audio')
    if family(d.name) == 'mixture' and task != 'best_rq':
      raise ValueError(f'data.name={d.name!r} is a mixture of datasets, which holds their audio '
                       f"only: head.kind={task!r} needs one dataset (a mixture serves "
                       "head.kind='best_rq', self-supervised pre-training)")
    if task == 'classification' and spec.label_key is None:
      raise ValueError(f'data.name={d.name!r} has no utterance labels; head.kind must be ctc')
    if getattr(builder, 'task', task) != task and task != 'best_rq':
      raise ValueError(f'data.name={d.name!r} is a {builder.task} manifest (its train lines carry '
                       f'{"labels" if builder.task == "classification" else "text"}); '
                       f'head.kind={task!r} needs the other kind')
    # Batch sizes divide over the processes and over the data-parallel mesh axes.
    multiple = math.lcm(jax.process_count(), data_ways)
    buckets = pipeline.make_buckets(tuple(d.bucket_seconds), d.batch_seconds,
                                    sample_rate_hz=spec.sample_rate_hz, multiple_of=multiple)
    eval_batch = -(-d.eval_batch_size // multiple) * multiple
    return cls(builder, spec, buckets, task, d.max_tokens_per_second, eval_batch, d.num_threads,
               os.path.join(data_dir, 'index'), frames, how)

  # -- preparation ---------------------------------------------------------------------------
  def prepare(self) -> None:
    """Writes the dataset's array_record files (no-op if they exist). Synthesis for the embedded
    corpus; LibriSpeech would download here, so the demo and tests never use it unprepared."""
    self.builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=1))

  def source(self, split: str):
    splits = self.builder.info.splits
    if splits and split not in splits:
      raise ValueError(f'{self.builder.info.full_name} has splits '
                       f'{sorted(self.builder.info.splits)}; {split!r} is not one of them')
    return self.builder.as_data_source(split=split)

  def texts(self, split: str) -> list[str]:
    """Every transcript of `split`, in order (read once: tokenizers and decoders share it)."""
    if split not in self._texts:
      source = self.source(split)
      self._texts[split] = [self.text(source[i]) for i in range(len(source))]
    return self._texts[split]

  @property
  def num_classes(self) -> int:
    return self.builder.info.features[self.spec.label_key].num_classes

  @property
  def class_names(self) -> list[str]:
    return list(self.builder.info.features[self.spec.label_key].names)

  def text(self, example: dict) -> str:
    text = _text(example[self.spec.text_key]).strip()
    text = text.lower() if self.spec.lowercase else text
    return normalize_text(text, self.text_normalization)

  def tokenizer(self, tokenizer_config, cache_dir: str, split: str = 'train'):
    """The tokenizer for this dataset, trained on `split`'s transcripts and cached."""
    t = tokenizer_config
    if t.get('file'):  # a given tokenizer (a base's own, to score it before adaptation)
      if not os.path.isfile(t.file):
        raise ValueError(f'tokenizer.file={t.file!r} does not exist; pass a tokenizer written '
                         "under a run's tokenizers/ folder, or '' to train one on the data")
      return tokenizer_lib.load_or_train(t.file, lambda: [])
    name = self.builder.info.full_name.replace('/', '-')
    suffix = 'chars' if t.kind == 'chars' else f'{t.kind}-{t.model_type}-{t.vocab_size}'
    if self.text_normalization != 'none':
      suffix += f'-{self.text_normalization}'
    return tokenizer_lib.load_or_train(
        os.path.join(cache_dir, f'{name}-{split}-{suffix}.model'),
        lambda: self.texts(split), kind=t.kind, vocab_size=t.vocab_size, model_type=t.model_type)

  # -- shapes --------------------------------------------------------------------------------
  def bucket_for(self, num_samples: int) -> pipeline.Bucket | None:
    return next((b for b in self.buckets if b.max_samples >= num_samples), None)

  def label_capacity(self, bucket: pipeline.Bucket) -> int:
    """Label length of a bucket's batches: what its audio can hold, at most what the model can
    emit."""
    seconds = bucket.max_samples / self.spec.sample_rate_hz
    return max(min(self.frames(bucket.max_samples),
                   math.ceil(seconds * self.max_tokens_per_second)), 1)

  def training_index(self, split: str, tokenizer) -> pipeline.SplitIndex:
    """The examples of `split` a training run reads: for CTC, those whose labels fit their
    frames and bucket (`index` with the tokenizer); else every usable one."""
    return self.index(split, tokenizer if self.task == 'ctc' else None)

  def index(self, split: str, tokenizer=None) -> pipeline.SplitIndex:
    """Which examples of `split` are usable (cached per dataset, split, limits and tokenizer)."""
    encode = (lambda text: tokenizer.encode(text)) if tokenizer is not None else None

    def max_tokens(num_samples: int) -> int:
      # CTC needs a frame per label; the label capacity of the example's bucket also bounds it.
      return min(self.frames(num_samples), self.label_capacity(self.bucket_for(num_samples)))

    def scan():
      return pipeline.scan_split(
          self.source(split), audio_key=self.spec.audio_key,
          max_samples=self.buckets[-1].max_samples,
          # Self-supervised pre-training reads audio only: transcripts are not required.
          text_fn=self.text if self.task != 'best_rq' else None,
          num_tokens=(lambda text: ctc_length(encode(text))) if encode else None,
          max_tokens=max_tokens, name=f'{self.builder.info.full_name}:{split}')

    key = dict(dataset=self.builder.info.full_name, split=split,
               buckets=[dataclasses.astuple(b) for b in self.buckets],
               tokens_per_second=self.max_tokens_per_second,
               frames=[self.frames(b.max_samples) for b in self.buckets],
               tokenizer=(hashlib.sha256(tokenizer.serialize()).hexdigest()
                          if tokenizer is not None else None))
    if self.text_normalization != 'none':
      key['text_normalization'] = self.text_normalization
    if self.task == 'best_rq':
      key['transcripts'] = False  # examples without transcripts are kept
    index = pipeline.cached_scan(self.index_dir, key, scan)
    merged = self.skipped.setdefault(split, {})
    for reason, count in index.skipped.items():
      merged[reason] = max(merged.get(reason, 0), count)
    return index

  # -- batches -------------------------------------------------------------------------------
  def collate(self, tokenizer, examples: list[dict], max_samples: int) -> dict[str, np.ndarray]:
    """Pads audio to `max_samples` and labels to the bucket's label capacity."""
    n = len(examples)
    audio = np.zeros((n, max_samples), np.int16)
    lengths = np.zeros((n,), np.int32)
    for i, ex in enumerate(examples):
      a = np.asarray(ex[self.spec.audio_key]).reshape(-1)
      audio[i, :a.size] = a
      lengths[i] = a.size
    batch = {'audio': audio, 'audio_lengths': lengths}
    if self.task == 'classification':
      batch['labels'] = np.array([int(ex[self.spec.label_key]) for ex in examples], np.int32)
      return batch
    if tokenizer is None:  # evaluation scores transcripts, not labels
      return batch
    capacity = self.label_capacity(self.bucket_for(max_samples))
    labels = np.zeros((n, capacity), np.int32)
    for i, ex in enumerate(examples):
      ids = tokenizer.encode(self.text(ex))[:capacity]
      labels[i, :len(ids)] = ids
    batch['labels'] = labels
    batch['label_mask'] = labels > 0
    return batch

  def train_loader(self, tokenizer, *, split: str = 'train', seed: int,
                   num_batches: int) -> pipeline.BatchLoader:
    """Shuffled, bucketed training batches: this process's rows of each global batch."""
    index = self.training_index(split, tokenizer)
    return pipeline.BatchLoader(
        self.source(split), index, self.buckets, functools.partial(self.collate, tokenizer),
        seed=seed, num_batches=num_batches, process_index=jax.process_index(),
        process_count=jax.process_count(), num_threads=self.num_threads)

  def eval_batches(self, split: str, tokenizer=None, *, as_trained: bool = False):
    """Every usable example of `split` once; padded rows have `weight` 0. Also returns the
    transcripts of the real rows, in batch order, for scoring. Only unusable audio is skipped:
    every model is scored on the same utterances, whatever its tokenizer. With `as_trained`,
    only the examples a training run reads (`index` with the tokenizer, for CTC: every label
    fits its frames and its bucket, so none is cut)."""
    index = self.training_index(split, tokenizer) if as_trained else self.index(split)
    return pipeline.eval_batches(self.source(split), index, self.buckets,
                                 functools.partial(self.collate, tokenizer),
                                 batch_size=self.eval_batch_size, text_fn=self.text)


def ctc_length(ids: list[int]) -> int:
  """Frames CTC needs for a label sequence: one per label, plus a blank between repeats."""
  return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


def open_for_config(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
                    ) -> tuple[SpeechData, tokenizer_lib.Tokenizer | None]:
  """(speech data, tokenizer) of `config.data`, prepared; sets the head's size from the data
  (the tokenizer's vocabulary or the number of classes)."""
  data = SpeechData.open(
      config.data, workdir=workdir, task=config.head.kind, frames=output_frames(config),
      # Each batch splits into grad_accum_steps micro-batches, each over the data axes.
      data_ways=mesh.shape['data'] * mesh.shape['fsdp'] * config.train.grad_accum_steps)
  data.prepare()
  tokenizer = None
  with config.unlocked():
    if config.head.kind == 'ctc':
      tokenizer = data.tokenizer(config.tokenizer,
                                 config.tokenizer.get('dir') or os.path.join(workdir, 'tokenizers'))
      config.head.vocab_size = tokenizer.vocab_size
    elif config.head.kind == 'classification':
      config.head.num_classes = data.num_classes
  return data, tokenizer


def dataset_description(data: SpeechData) -> str:
  """What names a dataset's content: its TFDS name, version and builder config (a synthetic
  domain's languages, voices, rates, noise and sizes), not where it is stored."""
  return builder_description(data.builder)


def builder_description(builder) -> str:
  """`dataset_description` of a TFDS builder."""
  return f'{builder.info.full_name} {builder.builder_config!r}'
