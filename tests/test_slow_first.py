"""The suite's order (tests/slow_first.py): marked slow tests first, longest first by the last
run's recorded durations, else by their marker; slow tests without the marker are named."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

TESTS = '''
import time
import pytest

def test_fast():
  pass

@pytest.mark.slow(seconds=1)
def test_short_mark_long_run():
  time.sleep(0.6)

@pytest.mark.slow(seconds=5)
def test_long_mark_short_run():
  pass

def test_slow_without_mark():
  time.sleep(0.4)
'''


def inner_pytest(folder, *args):
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTEST')}
  env['PYTHONPATH'] = os.pathsep.join([HERE, env.get('PYTHONPATH', '')])
  result = subprocess.run([sys.executable, '-m', 'pytest', '-v',
                           '--slow_unmarked_seconds=0.3', *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def order(stdout):
  return [line.split('::')[1].split()[0] for line in stdout.splitlines()
          if line.startswith('test_order.py::')]


def test_marked_tests_run_first_by_recorded_then_marked_seconds(tmp_path):
  (tmp_path / 'pytest.ini').write_text('[pytest]\n')
  (tmp_path / 'conftest.py').write_text(
      'from slow_first import pytest_addoption, pytest_configure  # noqa: F401\n')
  (tmp_path / 'test_order.py').write_text(TESTS)
  # A fresh clone (no cache): the markers' seconds, then the rest in file order.
  first = inner_pytest(tmp_path, '-p', 'no:xdist')
  assert order(first) == ['test_long_mark_short_run', 'test_short_mark_long_run', 'test_fast',
                          'test_slow_without_mark']
  summary = first[first.index('without @pytest.mark.slow'):]
  assert 'test_order.py::test_slow_without_mark' in summary
  assert 'test_short_mark_long_run' not in summary and 'test_fast' not in summary
  # The next run: the durations the first recorded win over the markers.
  assert order(inner_pytest(tmp_path, '-p', 'no:xdist')) == [
      'test_short_mark_long_run', 'test_long_mark_short_run', 'test_fast',
      'test_slow_without_mark']
  # Under pytest-xdist the controller records every worker's tests.
  cache = tmp_path / '.pytest_cache' / 'v' / 'tpa_jax' / 'durations'
  cache.unlink()
  inner_pytest(tmp_path, '-n', '2')
  recorded = json.loads(cache.read_text())
  assert sorted(recorded) == sorted(f'test_order.py::{name}' for name in order(first))
  assert recorded['test_order.py::test_short_mark_long_run'] >= 0.6
