"""The import contract (.importlinter, run by `make test`): tpa_jax's packages are floors, and an
import from a lower floor up to a higher one fails it, a function-local import included."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), 'lint-imports')


def lint(folder):
  env = dict(os.environ, PYTHONPATH=str(folder))
  return subprocess.run([LINT, '--no-cache', '--config', os.path.join(ROOT, '.importlinter')],
                        cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_an_import_up_a_floor_fails_the_contract(tmp_path):
  shutil.copytree(os.path.join(ROOT, 'tpa_jax'), tmp_path / 'tpa_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  kept = lint(tmp_path)
  assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-3000:]
  assert 'Contracts: 1 kept, 0 broken.' in kept.stdout
  # nn (a low floor) reaching up to the study, inside a function where a reader would miss it.
  layers = tmp_path / 'tpa_jax' / 'nn' / 'layers.py'
  layers.write_text(layers.read_text() + '\n\ndef _report():\n'
                    '  from tpa_jax.study import report  # a back-up import\n  return report\n')
  broken = lint(tmp_path)
  assert broken.returncode == 1, broken.stdout[-3000:]
  assert 'Contracts: 0 kept, 1 broken.' in broken.stdout
  assert 'tpa_jax.nn.layers -> tpa_jax.study.report' in broken.stdout
