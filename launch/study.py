"""The paper's study in one command: every method over one frozen base, fairly compared.

Usage:
  python launch/study.py --config=configs/study.py[:quick|full|scale] --workdir=runs/study
  make study

Runs each cell (task x method x seed) as an ordinary run in `<workdir>/cells/...`; writes
`study.json`, `study.md` and the plots into --workdir. A re-run skips finished cells and resumes
an interrupted one. `--cells=target_lang/*,*/tpa/*` runs a subset (patterns over
`task/method/seed=N`), so machines sharing one workdir can split a study; `--report` rebuilds the
table and plots from the cells that exist. `--publish=docs/results/NAME` then copies `study.md`
and the plots there under a header with the study's command, commit, machine and times (from
`<workdir>/provenance.json`) and `--publish_quiet` (whether nothing else ran beside it):
  python launch/study.py --report --workdir=runs/study --publish=docs/results/default \
      --publish_quiet=yes
"""

import shlex
import sys

from absl import flags
from ml_collections import config_flags

from tpa_jax.programs import cli

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/study.py',
                                          'Config file (path[:variant]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/study', 'Directory of the study.')
_CELLS = flags.DEFINE_list('cells', [], 'Glob patterns over task/method/seed=N: run only these.')
_REPORT = flags.DEFINE_bool('report', False, 'Only rebuild study.json, study.md and the plots.')
_PUBLISH = flags.DEFINE_string('publish', '', 'After the run or report: copy study.md and the '
                               'plots, under their provenance, to this folder.')
_PUBLISH_QUIET = flags.DEFINE_enum('publish_quiet', 'unknown', ['yes', 'no', 'unknown'],
                                   'For --publish: whether the study ran with nothing else on '
                                   'the machine (its times are comparable only then).')
_WORKER = flags.DEFINE_string('worker', '', 'Internal (set by the study for its worker '
                              'processes): the folder where they claim cells.')


def main(argv):
  # As the demo: XLA's CPU optimisation level 1 compiles a fifth faster (set before JAX starts).
  cli.start(argv, optimize_cpu_compile=True)
  # Imported after XLA_FLAGS is set: the study's modules import JAX.
  from tpa_jax.study import launch, publish  # pylint: disable=import-outside-toplevel
  launch.main(_CONFIG.value, _WORKDIR.value, cells=_CELLS.value, report_only=_REPORT.value,
              argv=sys.argv, worker=_WORKER.value)
  if _PUBLISH.value and not _WORKER.value:
    written = publish.publish(_WORKDIR.value, _PUBLISH.value, quiet=_PUBLISH_QUIET.value,
                              publish_command=shlex.join(['python', *sys.argv]))
    print('published: ' + ', '.join(written))


if __name__ == '__main__':
  cli.run(main)
