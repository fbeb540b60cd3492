"""Layer probes of frozen bases: a linear probe on every layer of each base, per task.

Usage:
  python launch/probe.py --config=configs/probe.py --workdir=runs/probe
  python launch/probe.py --config=configs/probe.py --workdir=runs/probe \
      --bases=random,supervised,best_rq@1500,best_rq@3000,best_rq@6000
  python launch/probe.py --config=configs/probe.py:tiny --workdir=/tmp/probe

Bases (--bases, default the config's probe.bases): random, supervised (the demo's base),
best_rq (the study's BEST-RQ base), best_rq@STEPS (a BEST-RQ pre-training run of STEPS steps,
its own base), NAME=PATH. A base that is not cached is pre-trained (or written) once. Writes
probe.json, probe.md (the test score per base and layer at the rate validation chose for that
layer, and the layer validation chose) and probe.png (score against layer, one line per base)
into --workdir, and prints probe.md; probes already cached there for a base (same weights,
data and settings) are not trained again.
"""

import os

from absl import flags
from ml_collections import config_flags

from tpa_jax.programs import cli

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/probe.py',
                                          'Config file (path[:variant]).', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/probe', 'Directory of the probes.')
_BASES = flags.DEFINE_string('bases', '', 'Comma-separated bases (default: probe.bases).')


def main(argv):
  cli.start(argv, optimize_cpu_compile=True)
  # Imported after XLA_FLAGS is set: the probes' modules import JAX.
  from tpa_jax.study import probe  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  if _BASES.value:
    config.probe.bases = _BASES.value
  probe.run(config, _WORKDIR.value)
  with open(os.path.join(_WORKDIR.value, 'probe.md')) as f:
    print(f.read())


if __name__ == '__main__':
  cli.run(main)
