"""Several JAX processes as one job: `jax.distributed.initialize` from flags or auto-detection.

    flags = distributed.define_flags()   # in a launch program, at module level
    ...
    distributed.start(argv, flags)   # first in main(): cli.start, then joins the job

With --coordinator_address, --num_processes and --process_id the processes find each other
through the coordinator (process 0's host:port). Without them, a Cloud TPU VM (a pod slice's
workers, or one host) initializes with no arguments and JAX reads the slice's topology from the
TPU metadata; a CPU or GPU host runs as a single process.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
from absl import flags, logging

from tpa_jax.errors import ConfigError
from tpa_jax.programs import cli

# Google's PCI vendor id, and the device ids of TPU chips (v3 .. TPU7x) under it. The vendor
# also makes the gVNIC network card, so the device id (or the accelerator class) must match too.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076')
_ACCELERATOR_PCI_CLASS = '0x12'  # "processing accelerator"


@dataclasses.dataclass(frozen=True)
class Flags:
  """The absl flags of a multi-process launch."""
  coordinator_address: flags.FlagHolder
  num_processes: flags.FlagHolder
  process_id: flags.FlagHolder


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Flags:
  """Defines --coordinator_address, --num_processes and --process_id (call once per program)."""
  return Flags(
      flags.DEFINE_string('coordinator_address', None,
                          'host:port of process 0, where the coordinator listens (several '
                          'processes without TPU auto-detection).', flag_values=flag_values),
      flags.DEFINE_integer('num_processes', None, 'Number of processes of the job.',
                           flag_values=flag_values),
      flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes-1.',
                           flag_values=flag_values))


def tpu_chips(sysfs: str = '/sys') -> int:
  """Number of TPU chips attached to this host over PCI (0 on CPU and GPU hosts)."""
  count = 0
  for vendor_path in glob.glob(os.path.join(sysfs, 'bus', 'pci', 'devices', '*', 'vendor')):
    device = os.path.dirname(vendor_path)
    if _read(vendor_path) != _GOOGLE_PCI_VENDOR:
      continue
    if (_read(os.path.join(device, 'device')) in _TPU_PCI_DEVICES
        or _read(os.path.join(device, 'class')).startswith(_ACCELERATOR_PCI_CLASS)):
      count += 1
  return count


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip().lower()
  except OSError:
    return ''


def initialize_args(coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, *, sysfs: str = '/sys') -> dict | None:
  """The arguments for `jax.distributed.initialize` ({} to auto-detect a TPU slice), or None
  when this is a single-process job. Raises a named error for an incomplete or bad triple."""
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if all(v is None for v in given.values()):
    return {} if tpu_chips(sysfs) else None
  missing = [f'--{k}' for k, v in given.items() if v is None]
  if missing:
    raise ConfigError(f'several processes need --coordinator_address, --num_processes and '
                     f'--process_id together; missing: {", ".join(missing)}')
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f'--coordinator_address={coordinator_address!r}: expected host:port with '
                     'a port in 1..65535, e.g. 10.0.0.2:1234 or localhost:1234')
  if num_processes < 1:
    raise ConfigError(f'--num_processes={num_processes}: expected a positive integer')
  if not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id={process_id}: expected 0 .. {num_processes - 1} '
                     f'(--num_processes={num_processes})')
  return given


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_seconds: int = 300) -> bool:
  """Joins this process to its job (see `initialize_args`); call before any device is used.
  Returns whether JAX's distributed runtime was initialized."""
  args = initialize_args(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  logging.info('jax.distributed.initialize(%s)',
               ', '.join(f'{k}={v!r}' for k, v in args.items()) or 'TPU auto-detection')
  jax.distributed.initialize(**args, initialization_timeout=timeout_seconds)
  logging.info('process %d of %d; %d local devices of %d', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def initialize_from_flags(holders: Flags) -> bool:
  """`initialize` with the values of the flags from `define_flags`."""
  return initialize(holders.coordinator_address.value, holders.num_processes.value,
                    holders.process_id.value)


def start(argv: list[str], holders: Flags) -> bool:
  """`cli.start` for a program whose job may span processes: CPU collectives over gloo (harmless
  on other backends; set before the backend starts), the thread pool sized for this process's
  share, then this process joined to its job (`initialize_from_flags`)."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  cli.start(argv, num_processes=holders.num_processes.value or 1)
  return initialize_from_flags(holders)


def is_primary() -> bool:
  """True in the process that writes the job's files (metrics, results): process 0."""
  return jax.process_index() == 0
