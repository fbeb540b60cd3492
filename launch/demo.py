"""The demo: pre-train on synthetic English, fail on Spanish, recover with TPA adapters only.

Usage:
  python launch/demo.py --config=configs/demo.py --workdir=runs/demo
  make demo WORKDIR=/tmp/demo

Prints a table of WERs, the trainable share of parameters and the wall time of each stage, and
writes results.json, metrics.jsonl, learning_curves.png, the base and the adapters into --workdir.
A second run reuses the prepared corpus and the pre-trained base.
"""

from absl import app, flags
from ml_collections import config_flags

from tpa_jax import demo, training

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Directory for data, base and results.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  training.quiet_library_logs()
  demo.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
