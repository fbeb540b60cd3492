"""Manifests from the layouts people have: a folder of audio files, a Kaldi data directory, a
TSV/CSV (Common Voice's), split deterministically into train / validation / test.

    utterances = from_folder(src) | from_kaldi(src) | from_tsv(src)
    write_manifests(utterances, output, fractions=(0.8, 0.1, 0.1), seed=0)

Splits never share a recording: utterances are grouped by speaker where the source has speaker
ids (Kaldi `utt2spk`, Common Voice `client_id`), else by audio file (so the segments of one file
stay together), and each group goes to one split by a seeded hash of its key.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import hashlib
import json
import os

from tpa_jax.data.manifest import ManifestError, SPLITS

AUDIO_EXTENSIONS = ('.wav', '.flac', '.ogg', '.opus', '.mp3')
LAYOUTS = ('folder', 'kaldi', 'tsv', 'asterisk')
# Debian's asterisk-core-sounds-en-wav (recordings) and asterisk-core-sounds-en (transcripts):
# about 550 English telephone prompts (8 kHz) by one speaker, CC-BY-SA-3.0.
ASTERISK_SOUNDS = '/usr/share/asterisk/sounds/en'
ASTERISK_TRANSCRIPTS = '/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz'


@dataclasses.dataclass(frozen=True)
class Utterance:
  path: str  # absolute
  text: str | None = None
  label: str | None = None
  speaker: str | None = None
  offset: float | None = None
  duration: float | None = None


@dataclasses.dataclass
class Skipped:
  """Source lines or files left out, by reason (printed by launch/manifest.py)."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, reason: str, what: str) -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < 5:
      self.examples[reason].append(what)


def from_folder(src: str, task: str, skipped: Skipped) -> list[Utterance]:
  """ctc: every audio file with a same-name .txt transcript; classification: every audio file
  in a subfolder, labelled by the subfolder's name (one folder per class)."""
  found = []
  for root, dirs, files in os.walk(src):
    dirs.sort()
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in AUDIO_EXTENSIONS:
        continue
      path = os.path.join(root, name)
      if task == 'classification':
        label = os.path.relpath(root, src)
        if label == '.':
          skipped.add('audio_outside_a_class_folder', path)
          continue
        found.append(Utterance(path, label=label.replace(os.sep, '/')))
        continue
      transcript = os.path.join(root, stem + '.txt')
      if not os.path.isfile(transcript):
        skipped.add('no_transcript_file', path)
        continue
      with open(transcript, encoding='utf-8') as f:
        found.append(Utterance(path, text=' '.join(f.read().split())))
  return found


def _kaldi_table(path: str, skipped: Skipped, required: bool = True) -> dict[str, str]:
  """A Kaldi 'key value...' file as {key: rest of the line}."""
  if not os.path.isfile(path):
    if required:
      raise ManifestError(f'Kaldi data directory: {path} is missing (a data directory holds '
                          'wav.scp and text, optionally segments and utt2spk)')
    return {}
  table = {}
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      key, _, value = line.strip().partition(' ')
      if not key:
        continue
      if not value.strip():
        skipped.add(f'{os.path.basename(path)}_line_without_a_value', f'{path}:{number}')
        continue
      table[key] = value.strip()
  return table


def from_kaldi(src: str, skipped: Skipped) -> list[Utterance]:
  """wav.scp (recording -> file), text (utterance -> transcript), optional segments (utterance
  -> recording, start, end) and utt2spk (utterance -> speaker)."""
  wav = _kaldi_table(os.path.join(src, 'wav.scp'), skipped)
  text = _kaldi_table(os.path.join(src, 'text'), skipped)
  segments = _kaldi_table(os.path.join(src, 'segments'), skipped, required=False)
  speakers = _kaldi_table(os.path.join(src, 'utt2spk'), skipped, required=False)

  def audio(recording: str) -> str | None:
    value = wav.get(recording)
    if value is None:
      skipped.add('recording_not_in_wav.scp', recording)
      return None
    if value.endswith('|'):
      skipped.add('piped_command_in_wav.scp', f'{recording} {value}')
      return None
    return os.path.normpath(os.path.join(src, value))

  found = []
  for utt, transcript in text.items():
    if segments:
      fields = segments.get(utt, '').split()
      if len(fields) != 3:
        skipped.add('utterance_not_in_segments', utt)
        continue
      path = audio(fields[0])
      try:
        start, end = float(fields[1]), float(fields[2])
      except ValueError:
        skipped.add('segment_times_not_numbers', utt)
        continue
      if path:
        found.append(Utterance(path, text=transcript, speaker=speakers.get(utt),
                               offset=start, duration=end - start))
    else:
      path = audio(utt)
      if path:
        found.append(Utterance(path, text=transcript, speaker=speakers.get(utt)))
  return found


def from_tsv(src: str, skipped: Skipped, *, path_column: str = 'path',
             text_column: str = 'sentence', speaker_column: str = 'client_id',
             audio_dir: str = '') -> list[Utterance]:
  """A TSV (.tsv) or CSV with a header: paths relative to `audio_dir` (default: the file's
  folder, or its clips/ folder where one exists, as Common Voice lays it out)."""
  if not os.path.isfile(src):
    raise ManifestError(f'--from={src}: the tsv layout reads one .tsv or .csv file')
  folder = os.path.dirname(os.path.abspath(src))
  if not audio_dir:
    clips = os.path.join(folder, 'clips')
    audio_dir = clips if os.path.isdir(clips) else folder
  delimiter = ',' if src.lower().endswith('.csv') else '\t'
  found = []
  with open(src, encoding='utf-8', newline='') as f:
    reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == '\t'
                            else csv.QUOTE_MINIMAL)
    columns = reader.fieldnames or []
    for needed in (path_column, text_column):
      if needed not in columns:
        raise ManifestError(f'{src}: no column {needed!r} (its columns: {columns}); name the '
                            'columns with --path_column and --text_column')
    for number, row in enumerate(reader, start=2):
      if not row.get(path_column):
        skipped.add('row_without_a_path', f'{src}:{number}')
        continue
      found.append(Utterance(os.path.normpath(os.path.join(audio_dir, row[path_column])),
                             text=(row.get(text_column) or '').strip(),
                             speaker=row.get(speaker_column) or None))
  return found


def from_asterisk(sounds: str, transcripts: str, skipped: Skipped) -> list[Utterance]:
  """The Asterisk prompts: `name: transcript` lines (name relative to `sounds`, without .wav);
  tones and silences (a transcript in [brackets]) are left out."""
  for path, package in ((sounds, 'asterisk-core-sounds-en-wav'),
                        (transcripts, 'asterisk-core-sounds-en')):
    if not os.path.exists(path):
      raise ManifestError(f'{path} is missing: install the Debian package {package} '
                          '(`make real-data` does)')
  found = []
  opener = gzip.open if transcripts.endswith('.gz') else open
  with opener(transcripts, 'rt', encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      line = line.strip()
      if not line or line.startswith(';'):
        continue
      name, sep, text = line.partition(':')
      text = text.strip()
      if not sep or not name.strip():
        skipped.add('line_without_a_name', f'{transcripts}:{number}')
        continue
      if text.startswith('[') and text.endswith(']'):
        skipped.add('tone_or_silence', name)
        continue
      path = os.path.join(sounds, name.strip() + '.wav')
      if not os.path.isfile(path):
        skipped.add('no_recording', path)
        continue
      found.append(Utterance(os.path.realpath(path), text=text))
  return found


def split_of(key: str, seed: int, fractions) -> str:
  """The split of a group, from a seeded hash of its key: the same on every machine."""
  digest = hashlib.sha256(f'{seed}|{key}'.encode()).digest()
  u = int.from_bytes(digest[:8], 'big') / 2**64
  edges, total = [], 0.0
  for fraction in fractions:
    total += fraction
    edges.append(total)
  for split, edge in zip(SPLITS, edges):
    if u < edge:
      return split
  return SPLITS[len(fractions) - 1]


def write_manifests(utterances: list[Utterance], output: str, *, fractions=(0.8, 0.1, 0.1),
                    seed: int = 0) -> dict[str, int]:
  """Writes output/{train,validation,test}.jsonl (paths relative to output); returns the counts
  per split. Groups: speakers where every utterance has one, else audio files."""
  if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
    raise ManifestError(f'--split={",".join(map(str, fractions))}: three non-negative fractions '
                        '(train, validation, test) that sum to 1, for example 0.8,0.1,0.1')
  if not utterances:
    raise ManifestError('no utterances found in the source (see the skipped counts)')
  by_speaker = all(u.speaker for u in utterances)
  os.makedirs(output, exist_ok=True)
  lines = {split: [] for split in SPLITS}
  for u in utterances:
    split = split_of(f'speaker:{u.speaker}' if by_speaker else f'file:{u.path}', seed, fractions)
    item = {'audio_filepath': os.path.relpath(u.path, output)}
    if u.label is not None:
      item['label'] = u.label
    else:
      item['text'] = u.text or ''
    if u.offset is not None:
      item['offset'] = round(u.offset, 4)
    if u.duration is not None:
      item['duration'] = round(u.duration, 4)
    lines[split].append(json.dumps(item, ensure_ascii=False))
  for split, items in lines.items():
    path = os.path.join(output, f'{split}.jsonl')
    if items or split == 'train':
      with open(path, 'w', encoding='utf-8') as f:
        f.write(''.join(line + '\n' for line in items))
    elif os.path.exists(path):
      os.remove(path)  # an earlier run's split that this one does not have
  return {split: len(items) for split, items in lines.items()}
