"""Evaluate a run's newest checkpoint, an adapter export over its base, or a base with its head,
on a split of the data.

Usage:
  python launch/evaluate.py --workdir=runs/es                  # the run's own config
  python launch/evaluate.py --workdir=runs/es --config=configs/adapt.py:model=tiny,method=tpa \
      --config.data.name=synthetic_speech/target_lang --config.model.frontend.kind=stacked \
      --config.model.frontend.stack=4 --config.data.eval_split=validation
  python launch/evaluate.py --workdir=runs/demo --config=configs/demo.py \
      --config.data.name=synthetic_speech/source --config.base.path=runs/demo/base/encoder \
      --head=runs/demo/base/head                                # the demo's base, no checkpoint
  python launch/evaluate.py --config=configs/tiny.py \
      --adapters=runs/tiny/adapters.safetensors                # an export over config.base.path
  python launch/evaluate.py --workdir=runs/es --mesh=data=1    # on another mesh than training's

Without --config the config saved with the run's newest checkpoint is used; with it (and with
--adapters), the config must give the same adapter spec and base as the adapters were trained
with, or they are refused with every differing field named. Speech data:
WER/CER (CTC) or accuracy; the random task: held-out synthetic batches (`wer` counts label
tokens as words). Prints the result as one JSON line and writes it to
<workdir>/eval_<split>.json (process 0). With --adapters or --head, --workdir may be left out:
the data is prepared and the result written in `<export without .safetensors>.eval/` (or
`<head>.eval/`), which is logged. Multi-process flags as in launch/train.py.
"""

import json

import jax
from absl import flags, logging
from ml_collections import config_flags

from tpa_jax import sharding
from tpa_jax.programs import evaluate
from tpa_jax.programs import cli, distributed
from tpa_jax.train import trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (path[:arg]); default: the config saved with the run.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints/, data, results); '
                               'default with --adapters or --head: <export or head>.eval.')
_SPLIT = flags.DEFINE_string('split', '', 'Split to evaluate; default config.data.eval_split.')
_HEAD = flags.DEFINE_string('head', '', 'A head saved with the base (checkpoint.save_state), '
                            'evaluated on config.base.path instead of a run checkpoint.')
_ADAPTERS = flags.DEFINE_string('adapters', '', 'An adapter export (launch/export.py '
                                '--kind=adapter) to evaluate over config.base.path; its spec '
                                'must match the config.')
_MESH = flags.DEFINE_string('mesh', '', 'Mesh axis sizes (data=..,fsdp=..,tensor=..; one may be '
                            '-1). Default: the config\'s mesh if it fits the devices here, else '
                            'every device on the data axis.')
_DISTRIBUTED = distributed.define_flags()


def main(argv):
  distributed.start(argv, _DISTRIBUTED)
  if _ADAPTERS.value and _CONFIG.value is None:
    cli.fail('--adapters needs --config: the config of the base and adapters (with '
             '--config.base.path=<the base>)')
  workdir = _WORKDIR.value or evaluate.default_workdir(_ADAPTERS.value, _HEAD.value)
  if not _WORKDIR.value:
    logging.info('No --workdir: data and eval_*.json go to %s', workdir)
  config = _CONFIG.value if _CONFIG.value is not None else evaluate.run_config(workdir)
  mesh = sharding.program_mesh(config.mesh, _MESH.value)
  trainer_lib.check_config(config, mesh=False)
  result = evaluate.evaluate(config, workdir, mesh, split=_SPLIT.value,
                             head_path=_HEAD.value, adapters_path=_ADAPTERS.value)
  if jax.process_index() == 0:
    print(json.dumps(result, default=str))


if __name__ == '__main__':
  cli.run(main)
