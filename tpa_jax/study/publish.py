"""Where a study's figures come from, and its results copied into the docs rather than retyped.

A study's launch records its provenance in `<workdir>/provenance.json`: the command, the commit
(and whether the checkout had uncommitted changes), the machine and the load average when it
started, and when it finished. `launch/study.py --report --publish=docs/results/NAME` copies
the study's own `study.md` and plots to that folder under a header naming all of it.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import shlex
import shutil
import subprocess

import jax

from tpa_jax.errors import ConfigError
from tpa_jax.train.metrics import write_json

PROVENANCE = 'provenance.json'
QUIET = ('yes', 'no', 'unknown')


def _git(*args: str) -> str | None:
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    out = subprocess.run(['git', '-C', repo, *args], capture_output=True, text=True, timeout=10,
                         check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def commit(exclude: str = '') -> str | None:
  """HEAD of the checkout tpa_jax runs from, with '+changes' when tracked files outside docs/
  (which no figure depends on) and `exclude` differ from it; None outside a git checkout."""
  head = _git('rev-parse', '--short', 'HEAD')
  if head is None:
    return None
  paths = ['--', '.', ':(exclude)docs'] + ([f':(exclude){os.path.abspath(exclude)}']
                                           if exclude else [])
  return head + ('+changes' if _git('status', '--porcelain', '--untracked-files=no', *paths)
                 else '')


def machine() -> str:
  """'Linux x86_64, 2 CPU cores, 24 GiB memory, jax cpu (4 x cpu)' for this process."""
  try:
    memory = f', {os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30:.0f} GiB memory'
  except (ValueError, OSError, AttributeError):
    memory = ''
  text = f'{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores{memory}'
  try:
    devices = jax.devices()
    text += f', jax {jax.default_backend()} ({len(devices)} x {devices[0].device_kind})'
  except Exception:  # pylint: disable=broad-except  (a description, never a failure)
    pass
  return text


def _utc(timestamp: float | None = None) -> str:
  """'2026-12-07 10:22 UTC' of `timestamp` (default: now)."""
  when = (datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
          if timestamp is not None else datetime.datetime.now(datetime.timezone.utc))
  return when.strftime('%Y-%m-%d %H:%M UTC')


def _read(workdir: str) -> dict:
  path = os.path.join(workdir, PROVENANCE)
  if not os.path.exists(path):
    return {'launches': []}
  with open(path) as f:
    return json.load(f)


def record_start(workdir: str, argv: list[str]) -> None:
  """Appends this launch (command, commit, machine, load average) to the study's record."""
  os.makedirs(workdir, exist_ok=True)
  record = _read(workdir)
  record['launches'].append({
      'command': shlex.join(['python', *argv]), 'commit': commit(), 'machine': machine(),
      'started': _utc(), 'load_average_1min_at_start': round(os.getloadavg()[0], 2),
      'finished': None})
  write_json(os.path.join(workdir, PROVENANCE), record)


def record_finish(workdir: str) -> None:
  record = _read(workdir)
  if record['launches']:
    record['launches'][-1]['finished'] = _utc()
    write_json(os.path.join(workdir, PROVENANCE), record)


def _last_cell_time(workdir: str) -> str | None:
  times = [os.path.getmtime(p) for p in glob.glob(
      os.path.join(workdir, 'cells', '**', 'test.json'), recursive=True)]
  return _utc(max(times)) if times else None


def header(workdir: str, dest: str, quiet: str, publish_command: str) -> str:
  """The provenance paragraph above a published study."""
  launches = _read(workdir)['launches']
  lines = [f'# Study results: {os.path.basename(os.path.normpath(dest))}', '',
           f'Published by `{publish_command}` from the study\'s own `study.md` and plots '
           f'(copied, not retyped) on {_utc()}, at commit {commit(dest) or "(not a git checkout)"}.',
           '']
  if launches:
    for i, launch in enumerate(launches):
      lines.append(
          f'- {"Run" if i == 0 else "Resumed"} by `{launch["command"]}`: started '
          f'{launch["started"]}, finished {launch["finished"] or "(not recorded: interrupted)"}'
          f', at commit {launch["commit"] or "(not recorded)"}, on {launch["machine"]}; load '
          f'average {launch["load_average_1min_at_start"]} at the start.')
  else:
    lines.append(f'- The study recorded no provenance (it ran before tpa_jax recorded one): '
                 f'command and commit not recorded; its last cell finished '
                 f'{_last_cell_time(workdir) or "(no cell)"}; published on {machine()}.')
  said = {'yes': 'yes (nothing else ran on the machine)', 'no': 'no (other work ran beside it)',
          'unknown': 'not stated'}[quiet]
  lines += [f'- Quiet: {said}. Its times are comparable to other quiet figures only if yes; '
            'its scores do not depend on it.', '']
  return '\n'.join(lines) + '\n'


def publish(workdir: str, dest: str, *, quiet: str = 'unknown', publish_command: str = '') -> list[str]:
  """Copies `study.md` (under the provenance header) and the plots of the study in `workdir`
  to `dest`; returns the files written. Replaces what an earlier publication left there."""
  if quiet not in QUIET:
    raise ConfigError(f'--publish_quiet={quiet!r}: accepted values are {QUIET}')
  source = os.path.join(workdir, 'study.md')
  if not os.path.exists(source):
    raise ConfigError(f'nothing to publish: {source} does not exist (run the study, or '
                      '--report on its workdir, first)')
  top = header(workdir, dest, quiet, publish_command)  # (the commit before dest changes)
  os.makedirs(dest, exist_ok=True)
  for old in glob.glob(os.path.join(dest, '*.png')) + glob.glob(os.path.join(dest, 'study.md')):
    os.remove(old)
  plots = sorted(glob.glob(os.path.join(workdir, '*.png')))
  with open(source) as f:
    table = f.read()
  if table.startswith('# Study\n'):  # (the header above is the page's title)
    table = table[len('# Study\n'):].lstrip('\n')
  images = ''.join(f'![{os.path.basename(p)[:-4]}]({os.path.basename(p)})\n\n' for p in plots)
  written = [os.path.join(dest, 'study.md')]
  with open(written[0], 'w') as f:
    f.write(top + '\n' + table.rstrip('\n') + '\n\n' +
            images)
  for p in plots:
    written.append(shutil.copy(p, os.path.join(dest, os.path.basename(p))))
  return written
