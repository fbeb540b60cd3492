"""Offline inference of many tasks over one frozen encoder.

Usage:
  python launch/transcribe.py --config=configs/demo.py \
      --config.base.path=runs/demo/base/encoder \
      --adapters=es=runs/es/adapters.safetensors,lang=runs/lang/adapters.safetensors \
      --input=list.tsv --output=out.jsonl

Each line of --input is `WAV_PATH<TAB>TASK[,TASK...]` (16-bit PCM, one channel, the base's
sample rate). The config describes the base (model, features, length buckets, base.path); each
adapter export (launch/export.py --kind=adapter) must have been trained on that base. Batches
mix tasks; an utterance asked for several tasks runs its frozen prefix once. One JSON line per
input: {"input", "line", "results": [{"task", "text"} or {"task", "label", "probability"}]}
(CTC text by best path, or with --decoding=lexicon by the lexicon decoder that the task's
export carries). Inputs that cannot run are skipped, counted by reason and logged; a summary
is printed as one JSON line.
"""

import json

from absl import flags
from ml_collections import config_flags

from tpa_jax import sharding
from tpa_jax.serve import multitask
from tpa_jax.programs import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config of the base (path[:arg]).',
                                          lock_config=True)
_ADAPTERS = flags.DEFINE_string('adapters', None, 'Tasks: NAME=FILE[,NAME=FILE...] of adapter '
                                'exports.')
_INPUT = flags.DEFINE_string('input', None, 'TSV: WAV_PATH<TAB>TASK[,TASK...] per line.')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON lines, one per input.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Rows (utterance x task) per batch.')
_SELECT = flags.DEFINE_enum('select', 'gather', ['gather', 'onehot'],
                            'How each row reads its adapters from the bank.')
_DECODING = flags.DEFINE_enum(
    'decoding', 'best_path', list(multitask.DECODINGS),
    "CTC text: 'best_path', or 'lexicon' (the lexicon decoder an adapter export carries when "
    'its run decoded with one; slower, on the host).')
_MESH = flags.DEFINE_string('mesh', '', 'Mesh axis sizes (data=..,fsdp=..,tensor=..). Default: '
                            'every device here on the data axis.')
flags.mark_flags_as_required(['config', 'adapters', 'input', 'output'])


def main(argv):
  cli.start(argv)
  config = _CONFIG.value
  cli.require_base(config)
  tasks = multitask.parse_adapters(_ADAPTERS.value)
  mesh = sharding.program_mesh(config.mesh, _MESH.value)
  model = multitask.MultiTaskModel(config, mesh, tasks=tasks, capacity=len(tasks),
                                   batch_sizes=(_BATCH.value,), select=_SELECT.value,
                                   decoding_kind=_DECODING.value)
  summary = multitask.transcribe(model, _INPUT.value, _OUTPUT.value)
  print(json.dumps(summary))


if __name__ == '__main__':
  cli.run(main)
