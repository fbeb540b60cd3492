"""What every program in `launch/` shares: its start (`start`; `distributed.start` for programs
of several processes), flag parsing that names a bad `--config.x=...` override, user errors
printed as one paragraph with a non-zero status (tracebacks stay for bugs), and readable logs.

Light on purpose (absl and ml_collections): the demo's corpus workers are spawned processes
that import launch/demo.py, and with it this module, again."""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import Callable

from absl import app, flags, logging

from tpa_jax import config as config_lib
from tpa_jax.errors import UserError


class _LibraryInfoFilter(std_logging.Filter):
  """Drops INFO records of orbax and TFDS (one line per file written), keeps their warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorflow_datasets'))


def quiet_library_logs() -> None:
  """Keeps the log readable: our progress lines, the libraries' warnings."""
  for handler in (logging.get_absl_handler(), *std_logging.getLogger().handlers):
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
      handler.addFilter(_LibraryInfoFilter())


def simulated_cpu_devices() -> int:
  """The CPU devices XLA_FLAGS asks the CPU backend to simulate (1 if none)."""
  for flag in os.environ.get('XLA_FLAGS', '').split():
    if flag.startswith('--xla_force_host_platform_device_count='):
      return int(flag.split('=', 1)[1])
  return 1


def threads_for_simulated_devices(num_processes: int = 1) -> None:
  """Gives the CPU backend's thread pool room for the collectives of simulated devices; call
  before JAX starts its backend.

  One process simulating N CPU devices runs each device's collectives on a shared pool of
  max(cores, N) threads, and a collective waiting for its peers holds its thread. XLA starts a
  step's top-level gradient all-reduce while the backward layer scan's own collectives are in
  flight, and devices enter them in different orders: with every thread held by a waiting
  collective, the devices that would complete them never run, and XLA aborts the process after
  40 s (seen on 2 cores with 4 devices: 9 aborts in 11 runs of 600 steps; with 16 threads, 0 in
  16). Several processes (gloo collectives over TCP) are left as they are: extra threads there
  let mismatched collectives overlap on one connection. PJRT_NPROC set by the user wins."""
  devices = simulated_cpu_devices()
  if num_processes == 1 and devices > 1:
    os.environ.setdefault('PJRT_NPROC', str(max(os.cpu_count() or 1, 4 * devices)))


def fast_cpu_compile() -> None:
  """LLVM optimisation level 1 for XLA's CPU kernels, unless XLA_FLAGS sets a level. Measured on
  the demo's train step (2 cores): compiling 5 bucket shapes 49 s instead of 62 s, and steps 5%
  faster (292 vs 306-315 ms). Set before JAX starts its backend."""
  flags_now = os.environ.get('XLA_FLAGS', '')
  if '--xla_backend_optimization_level' not in flags_now:
    os.environ['XLA_FLAGS'] = f'{flags_now} --xla_backend_optimization_level=1'.strip()


def start(argv: list[str], *, num_processes: int = 1, optimize_cpu_compile: bool = False,
          size_threads: bool = True) -> None:
  """The start of a launch program's `main`, before JAX starts its backend: no positional
  arguments, the CPU thread pool sized for simulated devices (`num_processes` of the job; not
  with `size_threads=False`, for a program that compiles but runs no collective), with
  `optimize_cpu_compile` XLA's faster CPU compile (`fast_cpu_compile`), readable logs."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if optimize_cpu_compile:
    fast_cpu_compile()
  if size_threads:
    threads_for_simulated_devices(num_processes)
  quiet_library_logs()


def require_base(config) -> None:
  """Ends the program with a named error when `config.base.path` is empty (programs that serve
  adapters over the base they were trained on)."""
  if not config.base.path:
    fail('--config.base.path is empty: pass the base the adapters were trained on')


def fail(message: str) -> None:
  """Ends the program with `message` as one paragraph on stderr and status 1."""
  sys.exit(f'error: {message}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with named errors instead of tracebacks: for a `--config.<field>` override
  the config lacks (config_flags raises AttributeError or KeyError naming only the key), and
  for bad flag values (a config file's `get_config` rejecting its argument among them)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):
    spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if spec is None and 'config' in flags.FLAGS:  # the program's default config file
      spec = flags.FLAGS['config'].default_unparsed
    if not spec:
      raise
    try:  # load the config file again to name the field and the accepted ones
      config_lib.check_overrides(config_lib.load_config_file(spec), argv)
    except ValueError as e:
      fail(str(e))
    raise
  except flags.Error as e:
    cause = _first_cause(e)
    if isinstance(cause, ValueError):  # a config file's get_config refusing its argument
      fail(f'{_flag_of(e)}{cause}')  # (config_flags' message would carry the traceback)
    fail(f'{e}\nPass --helpshort or --helpfull to see help on flags.')


def _first_cause(error: BaseException) -> BaseException:
  """The exception at the start of `error`'s chain (config_flags re-raises twice)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def _flag_of(error: flags.Error) -> str:
  """'--config=configs/x.py:arg: ' from absl's 'flag --config=...: message', or ''."""
  text = str(error)
  if text.startswith('flag --'):
    return text[len('flag '):].split(': ', 1)[0] + ': '
  return ''


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` where a UserError (a bad config value, a missing base, a workdir that is a
  file, adapters that do not fit) ends the program with its message and status 1."""
  def guarded(argv):
    try:
      main(argv)
    except UserError as e:
      logging.error('%s', e)
      fail(str(e))
  app.run(guarded, flags_parser=parse_flags)
