"""The demo: pre-train on synthetic English, fail on Spanish, recover with TPA adapters only.

Usage:
  python launch/demo.py --config=configs/demo.py --workdir=runs/demo
  make demo WORKDIR=/tmp/demo

Prints a table of WERs, the trainable share of parameters and the wall time of each stage, and
writes results.json, metrics.jsonl, learning_curves.png, the base and the adapters into --workdir.
A second run reuses the prepared corpus and the pre-trained base.
"""


from absl import flags
from ml_collections import config_flags

from tpa_jax.programs import cli  # light: absl and ml_collections

# JAX, TFDS and the library are imported in main(): the corpus's synthesis workers are spawned
# processes, which import this module again, and they need none of it (saves ~2.5 s a worker).

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Directory for data, base and results.')


def main(argv):
  cli.start(argv, optimize_cpu_compile=True)
  from tpa_jax.programs import demo  # pylint: disable=import-outside-toplevel  (see above)
  demo.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
