"""Evaluate a run's newest checkpoint (or a base with its head) on a split of its data.

Usage:
  python launch/evaluate.py --workdir=runs/es                  # the run's own config
  python launch/evaluate.py --workdir=runs/es --config=configs/adapt.py:model=tiny,method=tpa \
      --config.data.name=synthetic_speech/target_lang --config.model.frontend.kind=stacked \
      --config.model.frontend.stack=4 --config.data.eval_split=validation
  python launch/evaluate.py --workdir=runs/demo --config=configs/demo.py \
      --config.data.name=synthetic_speech/source --config.base.path=runs/demo/base/encoder \
      --head=runs/demo/base/head                                # the demo's base, no checkpoint

Without --config the config saved with the run's newest checkpoint is used; with it, that
config must describe the same base and adapters (or the checkpoint is refused). Speech data:
WER/CER (CTC) or accuracy; the random task: held-out synthetic batches (`wer` counts label
tokens as words). Prints the result as one JSON line and writes it to
<workdir>/eval_<split>.json (process 0). Multi-process flags as in launch/train.py.
"""

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from tpa_jax import distributed, run_eval, training

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (path[:arg]); default: the config saved with the run.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints/, data, results).')
_SPLIT = flags.DEFINE_string('split', '', 'Split to evaluate; default config.data.eval_split.')
_HEAD = flags.DEFINE_string('head', '', 'Without a run checkpoint: the head saved with the '
                            'base (checkpoints.save_state), evaluated on config.base.path.')
_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  distributed.initialize_from_flags(_DISTRIBUTED)
  training.quiet_library_logs()
  config = _CONFIG.value if _CONFIG.value is not None else run_eval.run_config(_WORKDIR.value)
  result = run_eval.evaluate(config, _WORKDIR.value, split=_SPLIT.value, head_path=_HEAD.value)
  if jax.process_index() == 0:
    print(json.dumps(result, default=str))


if __name__ == '__main__':
  app.run(main)
