"""Manifest datasets (NeMo JSON lines): audio in several formats and rates prepared once into
TFDS, every bad line counted by reason, named errors for what cannot be read at all."""

import json
import os

import numpy as np
import pytest
import soundfile

from tpa_jax import config as config_lib
from tpa_jax.data import datasets, manifest

RATE = manifest.SAMPLE_RATE_HZ


def tone(seconds, rate, hz=440.0, channels=1):
  t = np.arange(int(seconds * rate)) / rate
  x = 0.5 * np.sin(2 * np.pi * hz * t)
  return np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1) if channels > 1 else x


def write_audio(directory, name, seconds, rate, channels=1, fmt=None, subtype=None, hz=440.0):
  path = os.path.join(directory, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  soundfile.write(path, tone(seconds, rate, hz, channels), rate, format=fmt, subtype=subtype)
  return path


def write_manifest(directory, split, lines):
  with open(os.path.join(directory, f'{split}.jsonl'), 'w') as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + '\n')


def data_config(directory, **fields):
  d = config_lib.adapt_config("model=tiny,method=tpa").data
  d.name = f'manifest:{directory}'
  d.bucket_seconds = (2.0, 4.0)
  for key, value in fields.items():
    d[key] = value
  return d


def open_data(directory, workdir, task='ctc', **fields):
  data = datasets.SpeechData.open(data_config(directory, **fields), workdir=str(workdir),
                                  task=task, frames=lambda n: n // 640)
  data.prepare()
  return data


def snapshot(directory):
  return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
          for r, _, files in os.walk(directory) for f in files}


@pytest.fixture
def seeded(tmp_path):
  """A manifest folder with good lines in four formats and rates and every bad case."""
  d = tmp_path / 'corpus'
  d.mkdir()
  good = [
      write_audio(d, 'wav/a.wav', 1.0, 16000),
      write_audio(d, 'flac/b.flac', 1.5, 44100, channels=2),
      write_audio(d, 'ogg/c.ogg', 1.2, 8000, fmt='OGG', subtype='VORBIS'),
      write_audio(d, 'mp3/d.mp3', 1.0, 22050, fmt='MP3', subtype='MPEG_LAYER_III'),
      write_audio(d, 'wav/long.wav', 3.0, 16000),  # a segment of it
  ]
  long_file = write_audio(d, 'wav/too_long.wav', 5.0, 16000)
  (d / 'wav' / 'garbage.wav').write_bytes(b'not audio at all' * 10)
  soundfile.write(d / 'wav' / 'empty.wav', np.zeros((0,)), 16000)
  write_manifest(d, 'train', [
      {'audio_filepath': 'wav/a.wav', 'text': 'hello there'},
      {'audio_filepath': 'flac/b.flac', 'text': 'good morning'},
      {'audio_filepath': 'ogg/c.ogg', 'text': 'telephone speech', 'duration': 1.2},
      {'audio_filepath': 'mp3/d.mp3', 'text': 'an mp3 file'},
      {'audio_filepath': 'wav/long.wav', 'text': 'a segment', 'offset': 0.5, 'duration': 1.0},
      {'audio_filepath': 'wav/missing.wav', 'text': 'no file'},
      {'audio_filepath': 'wav/garbage.wav', 'text': 'unreadable'},
      {'audio_filepath': 'wav/empty.wav', 'text': 'empty audio'},
      {'audio_filepath': 'wav/a.wav', 'text': 'zero duration', 'duration': 0},
      {'audio_filepath': 'wav/a.wav', 'text': 'offset past the end', 'offset': 9.0},
      {'audio_filepath': 'wav/a.wav', 'text': '   '},
      {'audio_filepath': os.path.relpath(long_file, d), 'text': 'longer than 4 s'},
      {'audio_filepath': 'wav/a.wav', 'label': 'a_label'},
      {'audio_filepath': 'wav/shared.wav', 'text': 'also in test'},
  ])
  write_audio(d, 'wav/shared.wav', 1.0, 16000)
  write_audio(d, 'wav/other.wav', 2.0, 16000)
  write_manifest(d, 'test', [{'audio_filepath': 'wav/shared.wav', 'text': 'in test'},
                             {'audio_filepath': 'wav/other.wav', 'text': 'the whole file'}])
  return d, good


def test_a_seeded_manifest_is_prepared_with_every_bad_line_counted(seeded, tmp_path):
  d, _ = seeded
  before = snapshot(d)
  data = open_data(d, tmp_path / 'work')
  assert snapshot(d) == before  # nothing under DIR written or changed
  report = json.load(open(os.path.join(data.builder.data_dir, 'prepare.json')))
  assert report['rejected'] == {
      'missing_file': 1, 'unreadable_audio': 1, 'empty_audio': 1, 'nonpositive_duration': 1,
      'offset_past_end': 1, 'empty_text': 1, 'longer_than_the_longest_bucket': 1,
      'label_in_ctc_manifest': 1, 'file_in_two_splits': 1}
  assert report['kept'] == {'train': 5, 'test': 2}
  assert report['task'] == 'ctc'
  assert 'train.jsonl:6 ' in report['rejected_examples']['missing_file'][0]
  conv = report['conversions']
  assert conv['resampled_from_44100_hz'] == 1 and conv['resampled_from_8000_hz'] == 1
  assert conv['resampled_from_22050_hz'] == 1 and conv['mixed_down_from_2_channels'] == 1
  assert {'format_wav', 'format_flac', 'format_ogg', 'format_mp3'} <= set(conv)
  assert data.texts('train') == ['hello there', 'good morning', 'telephone speech',
                                 'an mp3 file', 'a segment']
  source = data.source('train')
  lengths = [np.asarray(source[i]['audio']).size / RATE for i in range(len(source))]
  # Resampled to 16 kHz: every file keeps its duration (MP3 adds encoder padding).
  np.testing.assert_allclose(lengths[:3], [1.0, 1.5, 1.2], atol=1e-3)
  assert 1.0 <= lengths[3] <= 1.1
  assert lengths[4] == pytest.approx(1.0, abs=1e-3)  # the segment [0.5 s, 1.5 s)
  for i in range(3):  # the 440 Hz tone survives resampling and mixing down
    audio = np.asarray(source[i]['audio'], np.float64)
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * RATE / audio.size - 440.0) < 5.0


def test_an_unchanged_manifest_is_never_prepared_again_and_an_edited_one_is(seeded, tmp_path):
  d, _ = seeded
  work = tmp_path / 'work'
  first = open_data(d, work)
  report_path = os.path.join(first.builder.data_dir, 'prepare.json')
  written = os.stat(report_path).st_mtime_ns
  again = open_data(d, work)
  assert again.builder.data_dir == first.builder.data_dir
  assert os.stat(report_path).st_mtime_ns == written  # not prepared again
  with open(d / 'test.jsonl', 'a') as f:
    f.write(json.dumps({'audio_filepath': 'wav/a.wav', 'text': 'a new line'}) + '\n')
  edited = open_data(d, work)
  assert edited.builder.data_dir != first.builder.data_dir
  # a.wav is now in two splits: test keeps it (test, then validation, then train), train not.
  assert len(edited.source('test')) == 3
  assert 'hello there' not in edited.texts('train') and len(edited.source('train')) == 4


def test_classification_manifests_take_labels_from_the_train_split(tmp_path):
  d = tmp_path / 'labels'
  d.mkdir()
  for i, label in enumerate(['yes', 'no', 'yes', 'no']):
    write_audio(d, f'{label}{i}.wav', 0.5, 16000, hz=300 + 100 * i)
  write_manifest(d, 'train', [{'audio_filepath': f'{label}{i}.wav', 'label': label}
                              for i, label in enumerate(['yes', 'no', 'yes'])])
  write_manifest(d, 'test', [{'audio_filepath': 'no3.wav', 'label': 'no'},
                             {'audio_filepath': 'no3.wav', 'label': 'maybe'}])
  data = open_data(d, tmp_path / 'work', task='classification')
  assert data.class_names == ['no', 'yes'] and data.num_classes == 2
  test = data.source('test')
  assert len(test) == 1 and data.class_names[int(test[0]['label'])] == 'no'
  with pytest.raises(ValueError, match='is a classification manifest'):
    open_data(d, tmp_path / 'work', task='ctc')


def test_text_normalization_applies_to_every_transcript(seeded, tmp_path):
  d, _ = seeded
  write_manifest(d, 'train', [{'audio_filepath': 'wav/a.wav', 'text': "Hello, THERE! It's me."}])
  write_manifest(d, 'test', [{'audio_filepath': 'wav/other.wav', 'text': 'x'}])
  data = open_data(d, tmp_path / 'work', text_normalization='lower_no_punctuation')
  assert data.texts('train') == ["hello there it's me"]
  assert datasets.normalize_text('Hello,  There', 'lower') == 'hello, there'
  with pytest.raises(ValueError, match="text_normalization='upper'.*'none', 'lower'"):
    open_data(d, tmp_path / 'work', text_normalization='upper')


@pytest.mark.parametrize('lines, message', [
    (None, 'has no train.jsonl'),
    (['{"audio_filepath": "a.wav", "text": "ok"}', '{not json'], r'train.jsonl:2: not a JSON'),
    (['{"text": "no path"}'], 'train.jsonl:1: missing the required key audio_filepath'),
    (['{"audio_filepath": "a.wav"}'], 'train.jsonl:1: has neither text'),
    (['{"audio_filepath": "missing.wav", "text": "x"}'], 'every line was rejected.*missing_file'),
])
def test_manifests_that_cannot_be_read_are_named_errors(tmp_path, lines, message):
  d = tmp_path / 'bad'
  d.mkdir()
  write_audio(d, 'a.wav', 0.5, 16000)
  if lines is not None:
    write_manifest(d, 'train', lines)
  with pytest.raises(manifest.ManifestError, match=message):
    open_data(d, tmp_path / 'work')


# -- manifests from the layouts people have ------------------------------------------------------

def run_manifest(*args):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, 'launch/manifest.py', *args], cwd=root,
                        capture_output=True, text=True, timeout=120)


def read_lines(directory, split):
  path = os.path.join(directory, f'{split}.jsonl')
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_a_folder_of_recordings_becomes_a_deterministic_manifest_that_prepares(tmp_path):
  src = tmp_path / 'recordings'
  for i in range(20):
    write_audio(src, f'session{i % 3}/utt{i:02d}.wav', 0.5, 16000, hz=200 + 20 * i)
    (src / f'session{i % 3}' / f'utt{i:02d}.txt').write_text(f'utterance number {i}\n')
  write_audio(src, 'untranscribed.flac', 0.5, 16000)
  before = snapshot(src)
  out = tmp_path / 'manifests'
  result = run_manifest(f'--from={src}', '--layout=folder', f'--output={out}', '--seed=3')
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['skipped'] == {'no_transcript_file': 1} and not summary['by_speaker']
  splits = {s: read_lines(out, s) for s in manifest.SPLITS}
  assert sum(map(len, splits.values())) == 20 == sum(summary['utterances'].values())
  files = [{line['audio_filepath'] for line in lines} for lines in splits.values()]
  assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
  assert snapshot(src) == before
  again = tmp_path / 'again'
  assert run_manifest(f'--from={src}', '--layout=folder', f'--output={again}',
                      '--seed=3').returncode == 0
  assert all(read_lines(again, s) == splits[s] for s in manifest.SPLITS)  # deterministic
  data = open_data(out, tmp_path / 'work')
  assert len(data.source('train')) == len(splits['train'])
  assert set(data.texts('train')) == {line['text'] for line in splits['train']}


def test_a_kaldi_directory_with_segments_splits_by_speaker(tmp_path):
  src = tmp_path / 'kaldi'
  src.mkdir()
  wav_scp, text, segments, utt2spk = [], [], [], []
  for r in range(6):
    write_audio(src, f'rec{r}.flac', 2.0, 8000)
    wav_scp.append(f'rec{r} rec{r}.flac')
    for s in range(2):
      utt = f'spk{r % 3}-rec{r}-{s}'
      text.append(f'{utt} words of segment {s}')
      segments.append(f'{utt} rec{r} {s * 1.0:.2f} {s * 1.0 + 0.8:.2f}')
      utt2spk.append(f'{utt} spk{r % 3}')
  wav_scp.append('rec9 sox rec9.wav -t wav - |')
  for name, lines in (('wav.scp', wav_scp), ('text', text), ('segments', segments),
                      ('utt2spk', utt2spk)):
    (src / name).write_text('\n'.join(sorted(lines)) + '\n')
  out = tmp_path / 'out'
  result = run_manifest(f'--from={src}', '--layout=kaldi', f'--output={out}',
                        '--split=0.34,0.33,0.33')
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['by_speaker'] and sum(summary['utterances'].values()) == 12
  speakers = [{line['audio_filepath'] for line in read_lines(out, s)} for s in manifest.SPLITS]
  assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2])
  line = read_lines(out, 'train')[0]
  assert line['duration'] == pytest.approx(0.8) and line['offset'] in (0.0, 1.0)
  data = open_data(out, tmp_path / 'work')
  audio = np.asarray(data.source('train')[0]['audio'])
  assert audio.size == pytest.approx(0.8 * RATE, abs=2)  # the segment, resampled from 8 kHz


def test_a_common_voice_tsv_with_clips_and_bad_columns(tmp_path):
  src = tmp_path / 'cv'
  rows = ['client_id\tpath\tsentence']
  for i in range(8):
    write_audio(src, f'clips/c{i}.mp3', 0.6, 48000, fmt='MP3', subtype='MPEG_LAYER_III')
    rows.append(f'speaker{i % 4}\tc{i}.mp3\tSentence number {i}.')
  (src / 'validated.tsv').write_text('\n'.join(rows) + '\n')
  out = tmp_path / 'out'
  result = run_manifest(f'--from={src / "validated.tsv"}', '--layout=tsv', f'--output={out}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])['by_speaker']
  everything = [line for s in manifest.SPLITS for line in read_lines(out, s)]
  assert len(everything) == 8
  assert all(os.path.isfile(os.path.join(out, line['audio_filepath'])) for line in everything)
  bad = run_manifest(f'--from={src / "validated.tsv"}', '--layout=tsv', f'--output={out}',
                     '--text_column=transcript')
  assert bad.returncode == 1 and "no column 'transcript'" in bad.stderr
  assert 'Traceback' not in bad.stderr
  bad_split = run_manifest(f'--from={src / "validated.tsv"}', '--layout=tsv', f'--output={out}',
                           '--split=0.5,0.6,0.1')
  assert bad_split.returncode == 1 and 'sum to 1' in bad_split.stderr


# -- the real-speech task (Debian's Asterisk prompts, installed by .ci/run and `make real-data`) --

def run_program(*args, timeout=600):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.slow(seconds=77)
def test_a_tiny_model_trains_on_the_recorded_prompts_and_is_evaluated(tmp_path):
  """The recordings are real (one speaker, 8 kHz): their manifest is the same on every machine,
  prepares with every file resampled, and a tiny TPA run trains and is scored on its test split."""
  out = tmp_path / 'asterisk'
  first = run_program('launch/manifest.py', '--layout=asterisk', f'--output={out}')
  assert first.returncode == 0, first.stderr[-2000:]
  summary = json.loads(first.stdout.strip().splitlines()[-1])
  assert summary['skipped']['tone_or_silence'] >= 1 and sum(summary['utterances'].values()) > 500
  again = tmp_path / 'again'
  assert run_program('launch/manifest.py', '--layout=asterisk', f'--output={again}').returncode == 0
  for split in manifest.SPLITS:  # the fixed split
    assert [line['text'] for line in read_lines(again, split)] == [
        line['text'] for line in read_lines(out, split)]
  workdir = tmp_path / 'run'
  config = [f'--config=configs/adapt.py:model=tiny,method=tpa,data=manifest:{out}',
            '--config.data.text_normalization=lower_no_punctuation',
            '--config.data.eval_batch_size=16']
  train = run_program('launch/train.py', *config, f'--workdir={workdir}',
                      '--config.train.num_steps=4', '--config.checkpoint.every_steps=4',
                      '--config.train.log_every_steps=2', '--config.data.eval_split=')
  assert train.returncode == 0, train.stderr[-3000:]
  prepared = [json.load(open(p)) for p in
              __import__('glob').glob(str(workdir / 'data' / 'manifest_speech' / '*' / '*' /
                                          'prepare.json'))]
  assert len(prepared) == 1
  report = prepared[0]
  conversions, kept = report['conversions'], sum(report['kept'].values())
  # Every file read was 8 kHz WAV (the silent ones are read, then rejected).
  assert conversions == {'format_wav': conversions['resampled_from_8000_hz'],
                         'resampled_from_8000_hz': kept + report['rejected'].get('silent_audio', 0)}
  assert set(report['rejected']) <= {'longer_than_the_longest_bucket', 'silent_audio'}
  losses = [json.loads(line)['loss'] for line in open(workdir / 'metrics.jsonl')
            if 'loss' in json.loads(line)]
  assert losses and all(np.isfinite(losses))
  unnamed = run_program('launch/evaluate.py', f'--workdir={workdir}')  # trained with no eval_split
  assert unnamed.returncode == 1 and 'pass --split=test' in unnamed.stderr
  evaluated = run_program('launch/evaluate.py', f'--workdir={workdir}', '--split=test')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert result['split'] == 'test' and result['data'] == f'manifest:{out}'
  assert result['num_utterances'] == report['kept']['test'] and result['wer'] > 0
  # The export carries what decodes the head: the tokenizer trained on the normalised text.
  exported = tmp_path / 'asterisk.safetensors'
  export = run_program('launch/export.py', f'--workdir={workdir}', '--kind=adapter',
                       f'--output={exported}')
  assert export.returncode == 0, export.stderr[-3000:]
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(exported), 'np') as f:
    metadata = f.metadata()
  assert 'tokenizer' in metadata, sorted(metadata)
