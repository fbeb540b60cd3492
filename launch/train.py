"""Train adapters (or fine-tune fully) with an ml_collections config.

Usage:
  python launch/train.py --config=configs/tiny.py --workdir=runs/tiny
  python launch/train.py --config=configs/adapt.py:model=demo,method=tpa --workdir=runs/demo \
      --config.train.num_steps=200 --config.optim.learning_rate=3e-3

Writes metrics.jsonl (one JSON object per logged step) and results.json into --workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from tpa_jax import training

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  training.quiet_library_logs()
  training.train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
