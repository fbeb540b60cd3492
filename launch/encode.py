"""Run a base encoder on one audio file and write its last hidden state.

Usage:
  python launch/encode.py --base=runs/w2v_bert/base --audio=speech.wav --output=speech.npy
  python launch/encode.py --base=runs/demo/base/encoder --config=configs/demo.py \
      --audio=speech.wav --output=speech.npy

--base is a converted base (launch/convert.py's --output, whose encoder.json holds the model and
features configs) or any base checkpoint with --config describing its model and features (the
demo's own bases). The audio (16-bit PCM WAV, first channel, at the features' sample rate) goes
through the base's own front end and encoder, without a head; the output is float32
[frames, dim], the valid frames of the last hidden state, comparable with a reference
implementation's output on the same file.
"""

import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from tpa_jax import convert
from tpa_jax.serve import encode
from tpa_jax.programs import cli

_BASE = flags.DEFINE_string('base', None, 'Base directory or checkpoint.')
_AUDIO = flags.DEFINE_string('audio', None, '16-bit PCM WAV file.')
_OUTPUT = flags.DEFINE_string('output', None, '.npy file to write.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config (model and features) of a base without saved configs.')
flags.mark_flags_as_required(['base', 'audio', 'output'])


def main(argv):
  cli.start(argv)
  config = _CONFIG.value if _CONFIG.value is not None else convert.default_config()
  if not convert.apply_base_config(config, _BASE.value) and _CONFIG.value is None:
    sys.exit(f'error: the base at {_BASE.value} has no saved model config (encoder.json); pass '
             '--config=<the config it was trained with>')
  try:
    audio = encode.read_wav(_AUDIO.value, config.features.sample_rate_hz)
    hidden = encode.encode_audio(config, convert.base_path(_BASE.value), audio)
  except ValueError as e:
    sys.exit(f'error: {e}')
  np.save(_OUTPUT.value, hidden)
  print(f'{_OUTPUT.value}: {hidden.shape[0]} frames x {hidden.shape[1]} (float32)')


if __name__ == '__main__':
  cli.run(main)
