"""Convert a public pre-trained encoder into a tpa_jax base.

Usage:
  python launch/convert.py --source=w2v_bert --input=w2v-bert-2.0 --output=runs/w2v_bert/base
  python launch/convert.py --source=fastconformer --input=parakeet-ctc-0.6b \
      --output=runs/parakeet/base

--input is a Hugging Face model directory (config.json + model.safetensors): w2v_bert reads
Wav2Vec2BertModel (facebook/w2v-bert-2.0) or a Wav2Vec2BertForCTC fine-tune; fastconformer
reads ParakeetEncoder or the encoder of a ParakeetForCTC/TDT/RNNT checkpoint. --output receives
encoder/ (the base checkpoint: pass it as --config.base.path, or the directory to
configs/w2v_bert.py:base=...) and encoder.json (the model and features configs, the source, and the tensors left out on purpose).
Every problem with the input (missing files or tensors, unexpected shapes, unmapped tensors,
unsupported settings) is reported at once, before anything is written.
"""

import json

from absl import flags

from tpa_jax import convert
from tpa_jax.programs import cli

_SOURCE = flags.DEFINE_enum('source', None, sorted(convert.SOURCES), 'What --input holds.')
_INPUT = flags.DEFINE_string('input', None, 'Hugging Face model directory.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write the base to.')
flags.mark_flags_as_required(['source', 'input', 'output'])


def main(argv):
  cli.start(argv)
  # A ConversionError lists every problem of the input; cli.run prints it without a traceback.
  summary = convert.convert(_SOURCE.value, _INPUT.value, _OUTPUT.value)
  print(json.dumps(summary, indent=2, default=str))


if __name__ == '__main__':
  cli.run(main)
