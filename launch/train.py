"""Train adapters (or fine-tune fully) with an ml_collections config.

Usage:
  python launch/train.py --config=configs/tiny.py --workdir=runs/tiny
  python launch/train.py --config=configs/adapt.py:model=demo,method=tpa --workdir=runs/demo \
      --config.train.num_steps=200 --config.optim.learning_rate=3e-3

Several processes (one per host; here two on one machine, each with its own devices):
  python launch/train.py --config=configs/tiny.py --workdir=runs/tiny2 \
      --coordinator_address=localhost:12345 --num_processes=2 --process_id=0 &
  python launch/train.py --config=configs/tiny.py --workdir=runs/tiny2 \
      --coordinator_address=localhost:12345 --num_processes=2 --process_id=1

On a Cloud TPU VM (every worker of a pod slice runs the same command) the process flags are
left out: the slice's topology is auto-detected. Resuming after a stop is a relaunch of every
process. Writes metrics.jsonl (one JSON object per logged step), TensorBoard event files
(tensorboard/) and results.json into --workdir, from process 0.
"""

from absl import flags
from ml_collections import config_flags

from tpa_jax.programs import cli, distributed
from tpa_jax.train import loop as training
from tpa_jax.train import trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, results.')
_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  distributed.start(argv, _DISTRIBUTED)
  trainer_lib.check_config(_CONFIG.value)
  training.train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
