"""Datasets from manifests (NeMo's JSON lines), prepared once into TFDS array_record files.

    data.name = 'manifest:DIR'   # DIR/train.jsonl (required), validation.jsonl, test.jsonl

One JSON object a line: `audio_filepath` (relative paths resolve against DIR), `text` (ASR) or
`label` (classification), optional `duration` and `offset` (seconds: a segment of a longer
file). Audio is read with libsndfile (WAV, FLAC, OGG/Vorbis/Opus, MP3, ...), mixed down to one
channel, resampled to 16 kHz with soxr (high quality) and stored as int16.

The prepared dataset is keyed by a hash of the manifests and of the audio files' sizes and
modification times, so an edited manifest (or a re-recorded file) is prepared again and an
unchanged one never is. Preparing never stops on one bad line: each rejected line (silent audio
among them) is counted by
reason (the first paths of each printed) and the counts, with the conversions made, are written
to `prepare.json` beside the dataset. A folder without `train.jsonl`, a malformed line, a
missing required key, or a split with every line rejected is a `ManifestError` before anything
is written. Nothing under DIR is written.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from tpa_jax.data import pipeline
from tpa_jax.errors import ConfigError

PREFIX = 'manifest:'
SPLITS = ('train', 'validation', 'test')
SAMPLE_RATE_HZ = 16000
MANIFEST_VERSION = '1.1.0'
_SHOWN_PER_REASON = 5  # paths printed for each reason a line was rejected


class ManifestError(ConfigError):
  """A manifest folder or line that cannot be used, named with its file and line."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of a manifest, resolved."""
  split: str
  line: int
  path: str  # absolute
  text: str | None
  label: str | None
  offset: float
  duration: float | None


def manifest_dir(name: str) -> str:
  """DIR of 'manifest:DIR', absolute."""
  return os.path.abspath(os.path.expanduser(name[len(PREFIX):]))


def read_manifests(directory: str) -> dict[str, list[Entry]]:
  """The entries of each split present; named errors for what cannot be read at all."""
  if not os.path.isfile(os.path.join(directory, 'train.jsonl')):
    present = sorted(f for f in os.listdir(directory)) if os.path.isdir(directory) else None
    raise ManifestError(
        f'manifest folder {directory} has no train.jsonl (a manifest folder holds train.jsonl '
        f'and optionally validation.jsonl and test.jsonl; '
        f'{"it holds " + str(present[:10]) if present is not None else "the folder does not exist"})')
  splits = {}
  for split in SPLITS:
    path = os.path.join(directory, f'{split}.jsonl')
    if not os.path.isfile(path):
      continue
    entries = []
    with open(path, encoding='utf-8') as f:
      for number, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        try:
          item = json.loads(raw)
        except json.JSONDecodeError as e:
          raise ManifestError(f'{path}:{number}: not a JSON object ({e.msg}); each line is '
                              'one object with audio_filepath and text or label') from None
        if not isinstance(item, dict) or 'audio_filepath' not in item:
          raise ManifestError(f'{path}:{number}: missing the required key audio_filepath '
                              f'(keys: {sorted(item) if isinstance(item, dict) else item!r})')
        if 'text' not in item and 'label' not in item:
          raise ManifestError(f'{path}:{number}: has neither text (speech recognition) nor '
                              'label (classification)')
        audio = os.path.expanduser(str(item['audio_filepath']))
        entries.append(Entry(
            split=split, line=number, path=os.path.normpath(os.path.join(directory, audio)),
            text=None if item.get('text') is None else str(item['text']),
            label=None if item.get('label') is None else str(item['label']),
            offset=float(item.get('offset') or 0.0),
            duration=None if item.get('duration') is None else float(item['duration'])))
    splits[split] = entries
  return splits


def manifest_task(splits: dict[str, list[Entry]]) -> str:
  """'classification' when the train manifest's lines carry labels, else 'ctc'."""
  train = splits['train']
  labelled = sum(e.label is not None for e in train)
  return 'classification' if labelled > len(train) / 2 else 'ctc'


def fingerprint(directory: str, splits: dict[str, list[Entry]], max_seconds: float) -> str:
  """A hash of the manifests' bytes, every audio file's size and modification time, and the
  settings that change what is stored."""
  h = hashlib.sha256(f'{MANIFEST_VERSION}|{SAMPLE_RATE_HZ}|{max_seconds}'.encode())
  for split in splits:
    with open(os.path.join(directory, f'{split}.jsonl'), 'rb') as f:
      h.update(split.encode() + f.read())
  for path in sorted({e.path for entries in splits.values() for e in entries}):
    try:
      stat = os.stat(path)
      h.update(f'{path}|{stat.st_size}|{stat.st_mtime_ns}'.encode())
    except OSError:
      h.update(f'{path}|missing'.encode())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class Report:
  """What preparation kept, rejected (by reason) and converted."""
  kept: dict = dataclasses.field(default_factory=lambda: collections.Counter())
  rejected: dict = dataclasses.field(default_factory=lambda: collections.Counter())
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  conversions: dict = dataclasses.field(default_factory=lambda: collections.Counter())
  audio_seconds: float = 0.0

  def reject(self, entry: Entry, reason: str) -> None:
    self.rejected[reason] += 1
    if len(self.examples[reason]) < _SHOWN_PER_REASON:
      self.examples[reason].append(f'{entry.split}.jsonl:{entry.line} {entry.path}')

  def as_dict(self) -> dict:
    return {'kept': dict(self.kept), 'rejected': dict(self.rejected),
            'rejected_examples': dict(self.examples), 'conversions': dict(self.conversions),
            'audio_seconds': round(self.audio_seconds, 3)}


def _check(entry: Entry, task: str, info, max_seconds: float, labels) -> str | None:
  """Why an entry cannot be used, from its line and its file's header, or None."""
  if task == 'ctc' and entry.label is not None and entry.text is None:
    return 'label_in_ctc_manifest'
  if task == 'classification' and entry.label is None:
    return 'text_in_classification_manifest'
  if task == 'ctc' and not (entry.text or '').strip():
    return 'empty_text'
  if task == 'classification' and labels is not None and entry.label not in labels:
    return 'label_not_in_train'
  if entry.duration is not None and entry.duration <= 0:
    return 'nonpositive_duration'
  if entry.offset < 0:
    return 'negative_offset'
  if info is None:
    return 'missing_file' if not os.path.exists(entry.path) else 'unreadable_audio'
  total = info.frames / info.samplerate
  if info.frames == 0:
    return 'empty_audio'
  if entry.offset >= total:
    return 'offset_past_end'
  seconds = (min(entry.duration, total - entry.offset) if entry.duration is not None
             else total - entry.offset)
  if seconds > max_seconds:
    return 'longer_than_the_longest_bucket'
  return None


def read_audio(entry: Entry, report: Report | None = None) -> np.ndarray:
  """The entry's segment as 16 kHz mono int16, counting conversions in `report`."""
  import soundfile  # pylint: disable=import-outside-toplevel  (the `speech` extra)
  import soxr  # pylint: disable=import-outside-toplevel  (the `speech` extra)
  with soundfile.SoundFile(entry.path) as f:
    rate, channels, fmt = f.samplerate, f.channels, f.format
    start = int(round(entry.offset * rate))
    frames = -1 if entry.duration is None else int(round(entry.duration * rate))
    f.seek(start)
    audio = f.read(frames, dtype='float32', always_2d=True)
  if report is not None:
    report.conversions[f'format_{fmt.lower()}'] += 1
    if channels > 1:
      report.conversions[f'mixed_down_from_{channels}_channels'] += 1
    if rate != SAMPLE_RATE_HZ:
      report.conversions[f'resampled_from_{rate}_hz'] += 1
  mono = audio.mean(axis=1)
  if rate != SAMPLE_RATE_HZ:
    mono = soxr.resample(mono, rate, SAMPLE_RATE_HZ, quality='HQ')
  return np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16)


def _info(path: str):
  import soundfile  # pylint: disable=import-outside-toplevel  (the `speech` extra)
  try:
    return soundfile.info(path)
  except Exception:  # noqa: BLE001 — libsndfile names many errors; every one means unreadable
    return None


def plan(directory: str, max_seconds: float) -> tuple[dict[str, list[Entry]], str, list, Report]:
  """(usable entries per split, task, class labels, report): every line checked against its
  file's header; a file in two splits is kept in the first of test, validation, train."""
  splits = read_manifests(directory)
  task = manifest_task(splits)
  labels = (sorted({e.label for e in splits['train'] if e.label is not None})
            if task == 'classification' else [])
  report, owner, usable = Report(), {}, {}
  for split in ('test', 'validation', 'train'):
    if split not in splits:
      continue
    usable[split] = []
    for entry in splits[split]:
      reason = _check(entry, task, _info(entry.path) if os.path.isfile(entry.path) else None,
                      max_seconds, labels if task == 'classification' else None)
      if reason is None and owner.setdefault(entry.path, split) != split:
        reason = 'file_in_two_splits'
      if reason:
        report.reject(entry, reason)
      else:
        usable[split].append(entry)
  for split, entries in usable.items():
    if not entries:
      raise ManifestError(
          f'{os.path.join(directory, split + ".jsonl")}: every line was rejected '
          f'({dict(report.rejected)}; first: {dict(report.examples)})')
  return {s: usable[s] for s in SPLITS if s in usable}, task, labels, report


@dataclasses.dataclass(eq=False)
class ManifestConfig(tfds.core.BuilderConfig):
  directory: str = ''
  max_seconds: float = 16.0


class PcmAudio(tfds.features.Audio):
  """Audio stored as raw int16 bytes (as the synthetic corpus stores it)."""

  def encode_example(self, audio_or_path_or_fobj):
    if isinstance(audio_or_path_or_fobj, (np.ndarray, list)):
      return tfds.features.Tensor.encode_example(self, np.asarray(audio_or_path_or_fobj))
    return super().encode_example(audio_or_path_or_fobj)


class ManifestSpeech(tfds.core.GeneratorBasedBuilder):
  """Speech from a manifest folder: 16 kHz int16 audio with transcripts or labels."""

  VERSION = tfds.core.Version(MANIFEST_VERSION)
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': 'Silent audio rejected (and counted) when prepared.'}

  def __init__(self, *, config: ManifestConfig, **kwargs):
    self._plan = plan(config.directory, config.max_seconds)
    super().__init__(config=config, **kwargs)

  @property
  def task(self) -> str:
    return self._plan[1]

  def _info(self) -> tfds.core.DatasetInfo:
    _, task, labels, _ = self._plan
    return self.dataset_info_from_configs(
        description=f'Manifests of {self.builder_config.directory}',
        features=tfds.features.FeaturesDict({
            'audio': PcmAudio(shape=(None,), dtype=np.int16, encoding='bytes',
                              sample_rate=SAMPLE_RATE_HZ),
            'transcript': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=labels or ['none']),
            'path': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(task=task),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    entries = self._plan[0]
    return {split: self._generate_examples(entries[split]) for split in entries}

  def _generate_examples(self, entries):
    report, labels = self._plan[3], self._plan[2]
    for entry in entries:
      try:
        audio = read_audio(entry, report)
      except Exception as e:  # noqa: BLE001 — a header that read but data that does not
        logging.warning('manifest: %s:%d %s: %s', entry.split, entry.line, entry.path, e)
        report.reject(entry, 'unreadable_audio')
        continue
      # Empty or silent (peak below -60 dBFS) audio: the pipeline's own test of usable audio.
      problem = pipeline.audio_problem(audio, max_samples=audio.size)
      if problem:
        report.reject(entry, problem)
        continue
      report.kept[entry.split] += 1
      report.audio_seconds += audio.size / SAMPLE_RATE_HZ
      yield f'{entry.split}-{entry.line:07d}', {
          'audio': audio, 'transcript': entry.text or '',
          'label': entry.label if labels else 'none', 'path': entry.path}

  def download_and_prepare(self, *args, **kwargs):
    """Prepares once (a no-op when this fingerprint is prepared), then writes prepare.json."""
    if self.is_prepared():  # TFDS's own check, before its logging
      return
    super().download_and_prepare(*args, **kwargs)
    report = self._plan[3].as_dict()
    with open(os.path.join(self.data_dir, 'prepare.json'), 'w') as f:
      json.dump({'manifest': self.builder_config.directory, 'task': self.task, **report}, f,
                indent=1)
    for reason, count in report['rejected'].items():
      logging.warning('manifest %s: %d line(s) rejected: %s (first: %s)',
                      self.builder_config.directory, count, reason,
                      report['rejected_examples'][reason])
    logging.info('manifest %s: kept %s, conversions %s', self.builder_config.directory,
                 report['kept'], report['conversions'])

  def is_prepared(self) -> bool:
    return os.path.isfile(os.path.join(self.data_dir, 'dataset_info.json'))


def open_builder(name: str, data_dir: str, max_seconds: float) -> ManifestSpeech:
  """The builder of 'manifest:DIR' under data_dir/manifest_speech/<fingerprint>/."""
  directory = manifest_dir(name)
  splits = read_manifests(directory)
  config = ManifestConfig(name=f'm{fingerprint(directory, splits, max_seconds)}',
                          version=MANIFEST_VERSION, directory=directory, max_seconds=max_seconds)
  return ManifestSpeech(config=config, data_dir=data_dir, file_format='array_record')
