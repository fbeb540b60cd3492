"""Write NeMo-style manifests (train / validation / test .jsonl) from the layout your data has.

Usage:
  python launch/manifest.py --from=recordings/ --layout=folder --output=manifests/mine
      # audio files with same-name .txt transcripts (--task=classification: one folder a class)
  python launch/manifest.py --from=data/train --layout=kaldi --output=manifests/kaldi
      # wav.scp + text (+ segments, utt2spk: splits by speaker)
  python launch/manifest.py --from=cv/en/validated.tsv --layout=tsv --output=manifests/cv
      # Common Voice: path / sentence / client_id columns (clips/ beside the TSV)
  python launch/manifest.py --layout=asterisk --output=runs/real_data/asterisk
      # Debian's Asterisk prompts (`make real-data`): the real-speech task of the study

Then train on it: `--config.data.name=manifest:manifests/mine`. Splits are deterministic for a
--seed, never share an audio file, and go by speaker where the source has speaker ids. Prints
the counts per split and what was skipped, as one JSON line. Nothing under --from is written.
"""

import json

from absl import flags

from tpa_jax.data import manifest_layouts as layouts
from tpa_jax.programs import cli

_FROM = flags.DEFINE_string('from', None, 'The source: a folder, a Kaldi data directory, a '
                            '.tsv / .csv file (asterisk: the sounds folder, default '
                            f'{layouts.ASTERISK_SOUNDS}).')
_TRANSCRIPTS = flags.DEFINE_string('transcripts', layouts.ASTERISK_TRANSCRIPTS,
                                   'asterisk layout: the prompts\' transcripts.')
_LAYOUT = flags.DEFINE_enum('layout', None, layouts.LAYOUTS, 'How the source is laid out.')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder to write train/validation/test.jsonl to.')
_SPLIT = flags.DEFINE_string('split', '0.8,0.1,0.1', 'Fractions of train, validation, test.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the split.')
_TASK = flags.DEFINE_enum('task', 'ctc', ('ctc', 'classification'),
                          'folder layout: transcripts (ctc) or one folder per class label.')
_PATH_COLUMN = flags.DEFINE_string('path_column', 'path', 'tsv layout: the audio path column.')
_TEXT_COLUMN = flags.DEFINE_string('text_column', 'sentence', 'tsv layout: the text column.')
_SPEAKER_COLUMN = flags.DEFINE_string('speaker_column', 'client_id',
                                      'tsv layout: the speaker column (absent: split by file).')
_AUDIO_DIR = flags.DEFINE_string('audio_dir', '', 'tsv layout: folder the paths are relative to '
                                 '(default: the TSV\'s folder, or its clips/ folder).')
flags.mark_flags_as_required(['layout', 'output'])


def main(argv):
  cli.start(argv)
  try:
    fractions = tuple(float(x) for x in _SPLIT.value.split(','))
  except ValueError:
    cli.fail(f'--split={_SPLIT.value}: three fractions (train, validation, test), e.g. 0.8,0.1,0.1')
  skipped = layouts.Skipped()
  if not _FROM.value and _LAYOUT.value != 'asterisk':
    cli.fail(f'--layout={_LAYOUT.value} needs --from (the source folder or file)')
  if _LAYOUT.value == 'asterisk':
    found = layouts.from_asterisk(_FROM.value or layouts.ASTERISK_SOUNDS, _TRANSCRIPTS.value,
                                  skipped)
  elif _LAYOUT.value == 'folder':
    found = layouts.from_folder(_FROM.value, _TASK.value, skipped)
  elif _LAYOUT.value == 'kaldi':
    found = layouts.from_kaldi(_FROM.value, skipped)
  else:
    found = layouts.from_tsv(_FROM.value, skipped, path_column=_PATH_COLUMN.value,
                             text_column=_TEXT_COLUMN.value, speaker_column=_SPEAKER_COLUMN.value,
                             audio_dir=_AUDIO_DIR.value)
  counts = layouts.write_manifests(found, _OUTPUT.value, fractions=fractions, seed=_SEED.value)
  print(json.dumps({'output': _OUTPUT.value, 'utterances': counts,
                    'by_speaker': all(u.speaker for u in found),
                    'skipped': dict(skipped.counts), 'skipped_examples': dict(skipped.examples)}))


if __name__ == '__main__':
  cli.run(main)
