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

from absl import flags
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
  distributed.start(argv, _DISTRIBUTED)
  trainer_lib.check_config(_CONFIG.value)
  pretrain.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
