"""The slowest tests first, so that pytest-xdist's workers share them out rather than one worker
ending the session alone on one (and the folders of `built_once` are built early).

A slow test carries `@pytest.mark.slow(seconds=S)`, S its measured duration (setup included).
Marked tests run first, the longest first: by the duration this machine's last run recorded in
pytest's cache (`.pytest_cache`, key `tpa_jax/durations`), else by S (a fresh clone has no
cache). Unmarked tests keep their order after them. A test whose call took longer than
`--slow_unmarked_seconds` (60) without the marker is named at the end of the run, so a renamed
or new slow test does not drop out of the order unnoticed (its setup is left out: a shared
fixture's build is paid by whichever test asks first).

Only tests without module-scoped fixtures take the marker: moving one away from its module's
other tests would build its module's fixtures again.
"""

from __future__ import annotations

import pytest

CACHE_KEY = 'tpa_jax/durations'


def pytest_addoption(parser):
  parser.addoption('--slow_unmarked_seconds', type=float, default=60.0,
                   help='name the tests that took longer than this without @pytest.mark.slow')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow(seconds): a slow test, run first (longest first)')
  config.pluginmanager.register(_SlowFirst(config), 'tpa_jax_slow_first')


def _marked_seconds(item) -> float:
  marker = item.get_closest_marker('slow')
  seconds = marker.kwargs.get('seconds', marker.args[0] if marker.args else None)
  if not isinstance(seconds, (int, float)) or seconds <= 0:
    raise pytest.UsageError(f'{item.nodeid}: @pytest.mark.slow needs seconds=<its measured '
                            f'duration, > 0>, got {marker}')
  return float(seconds)


class _SlowFirst:
  """The order, the durations of this run and the summary line, for one session."""

  def __init__(self, config):
    self.config = config
    self.durations: dict[str, list] = {}  # nodeid -> [seconds so far, of its call, marked]

  def pytest_collection_modifyitems(self, items):
    cache = getattr(self.config, 'cache', None)  # (None under -p no:cacheprovider)
    recorded = cache.get(CACHE_KEY, {}) if cache is not None else {}

    def order(item):
      if item.get_closest_marker('slow') is None:
        return (1, 0.0)
      return (0, -recorded.get(item.nodeid, _marked_seconds(item)))

    items.sort(key=order)  # (stable: unmarked tests keep their order)

  def pytest_runtest_logreport(self, report):
    """Sums setup, call and teardown per test (in xdist's controller: the workers' reports)."""
    seconds, call, marked = self.durations.get(report.nodeid,
                                               (0.0, 0.0, 'slow' in report.keywords))
    call += report.duration if report.when == 'call' else 0.0
    self.durations[report.nodeid] = [seconds + report.duration, call, marked]

  def pytest_sessionfinish(self):
    cache = getattr(self.config, 'cache', None)  # (None under -p no:cacheprovider)
    if not self.durations or cache is None or hasattr(self.config, 'workerinput'):
      return  # (an xdist worker: its controller records what every worker ran)
    recorded = cache.get(CACHE_KEY, {})
    recorded.update({nodeid: round(s, 2) for nodeid, (s, _, _) in self.durations.items()})
    cache.set(CACHE_KEY, recorded)

  def pytest_terminal_summary(self, terminalreporter):
    limit = self.config.getoption('slow_unmarked_seconds')
    # Its call alone: the setup of a session-wide fixture is paid by whichever test asks first.
    unmarked = sorted(((call, nodeid) for nodeid, (_, call, marked) in self.durations.items()
                       if not marked and call > limit), reverse=True)
    if unmarked:
      terminalreporter.write_sep('=', f'{len(unmarked)} test(s) over {limit:g} s without '
                                 '@pytest.mark.slow (add it, with the seconds shown)')
      for seconds, nodeid in unmarked:
        terminalreporter.write_line(f'{seconds:.1f}s {nodeid}')
