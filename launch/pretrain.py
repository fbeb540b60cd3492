"""Pre-train a base with BEST-RQ (self-supervised, on audio alone).

Usage:
  python launch/pretrain.py --config=configs/pretrain.py --workdir=runs/pretrain
  python launch/train.py --config=configs/adapt.py:model=demo,method=tpa,... \
      --config.base.path=runs/pretrain/base/encoder ...          # adapt the written base

Every weight trains with the sharded train step of launch/train.py; checkpoints every
`checkpoint.every_steps` and at a SIGTERM, and a relaunch resumes exactly. Several processes
take the flags of launch/train.py. Writes metrics.jsonl (loss, masked-prediction accuracy and
codebook usage per codebook), TensorBoard event files and results.json into --workdir, the fixed
quantizer in <workdir>/fixed_arrays, and, once the run is complete, the base in
<workdir>/base (encoder: what `base.path` takes; head: quantizer and prediction heads).
"""

import jax
from absl import app, flags
from ml_collections import config_flags

from tpa_jax.programs import cli, distributed
from tpa_jax.ssl import pretrain
from tpa_jax.train import trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/pretrain.py',
                                          'Config file (path[:arg]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, the base.')
_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  cli.threads_for_simulated_devices(_DISTRIBUTED.num_processes.value or 1)
  distributed.initialize_from_flags(_DISTRIBUTED)
  cli.quiet_library_logs()
  trainer_lib.check_config(_CONFIG.value)
  pretrain.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
