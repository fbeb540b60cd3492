"""Test harness: 4 simulated CPU devices (set before jax is imported) and small shared helpers."""

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Room in the CPU backend's thread pool for the simulated devices' collectives (see
# tpa_jax.programs.cli.threads_for_simulated_devices); subprocesses inherit it.
os.environ.setdefault('PJRT_NPROC', '16')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tpa_jax import config as config_lib  # noqa: E402
from tpa_jax import sharding  # noqa: E402
from tpa_jax.data import random_task  # noqa: E402


def tiny_config(method: str = 'tpa', **overrides):
  """The tiny preset with a method and flattened overrides ('model.position': 'rel_pos')."""
  config = config_lib.adapt_config(f'model=tiny,method={method}')
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def ctc_batch(config, seed: int = 0, batch_size: int = 4, num_frames: int = 64):
  return random_task.ctc_batch(np.random.default_rng(seed), batch_size=batch_size,
                             num_frames=num_frames, input_dim=config.model.frontend.input_dim,
                             vocab_size=config.head.vocab_size, num_labels=6)


def trained_task(method: str, overrides: dict, mesh, seed: int = 3, base_seed: int = 0):
  """(config, model, spec, export tensors) of a task whose adapters and head look trained
  (noise added to them) over the tiny base of `base_seed`; spec over base fingerprint 'base-fp'."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tpa_jax.checkpoint import spec as spec_lib  # pylint: disable=import-outside-toplevel
  from tpa_jax.checkpoint.adapter_file import flat_arrays  # pylint: disable=import-outside-toplevel
  from tpa_jax.nn import build  # pylint: disable=import-outside-toplevel
  from tpa_jax.train import partition  # pylint: disable=import-outside-toplevel
  config = tiny_config(method, **overrides)
  model = build.create_model(config, mesh, seed=base_seed)
  trainable = partition.trainable_filter(config.train.trainable)
  leaves, treedef = jax.tree.flatten(nnx.state(model, trainable))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  spec = spec_lib.from_config(config, 'base-fp')
  return config, model, spec, flat_arrays(nnx.state(model, trainable))


def host_arrays(path) -> dict:
  """The arrays of an orbax PyTree checkpoint, as numpy arrays keyed by their tree paths,
  whatever mesh or number of processes saved them."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.PyTreeCheckpointer() as c:
    tree = c.metadata(str(path)).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = c.restore(str(path), args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def free_port() -> int:
  """A TCP port of localhost that nothing listens on now."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Job:
  """Processes of one launch of `program` (with flags `common`), their logs in files (a full
  pipe would block a process). Every wait has a deadline, after which all processes are killed
  and the test fails with their logs (one hung in a collective waits for a dead peer)."""

  def __init__(self, log_dir, name, program, *common):
    self.log_dir, self.name, self.procs, self.logs = log_dir, name, [], []
    self.program, self.common = program, common

  def start(self, workdir, devices, *flags):
    log = os.path.join(self.log_dir, f'{self.name}-{len(self.procs)}.log')
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               JAX_PLATFORMS='cpu')
    if any(f.startswith('--num_processes=') for f in flags):
      env.pop('PJRT_NPROC', None)  # (see tpa_jax.programs.cli.threads_for_simulated_devices)
    with open(log, 'w') as f:
      self.procs.append(subprocess.Popen(
          [sys.executable, self.program, *self.common, f'--workdir={workdir}', *flags],
          cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    self.logs.append(log)
    return self

  def start_processes(self, workdir, count, *flags, devices=None):
    """`count` processes on localhost, `devices` CPU devices each (default: 4 in all)."""
    port = free_port()
    for p in range(count):
      self.start(workdir, devices or 4 // count, f'--coordinator_address=localhost:{port}',
                 f'--num_processes={count}', f'--process_id={p}', *flags)
    return self

  def log(self, i):
    with open(self.logs[i]) as f:
      return f.read()

  def fail(self, message):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    tails = '\n'.join(f'--- {log} ---\n' + self.log(i)[-3000:] for i, log in enumerate(self.logs))
    pytest.fail(f'{self.name}: {message}\n{tails}')

  def wait(self, deadline):
    while any(p.poll() is None for p in self.procs):
      if time.time() > deadline:
        self.fail('did not finish in time (a process hung or waits for a dead peer)')
      time.sleep(0.2)
    codes = [p.returncode for p in self.procs]
    if any(codes):
      self.fail(f'exit codes {codes}')


def logged_steps(workdir):
  """Steps of the complete lines of a run's metrics.jsonl (a killed run may leave a torn one)."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(line)['step'] for line in f if line.endswith('\n')]
  except FileNotFoundError:
    return []


# The slowest tests first, ordered by recorded durations (`@pytest.mark.slow`; tests/slow_first.py).
from slow_first import pytest_addoption, pytest_configure  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position


def session_root(tmp_path_factory):
  """A folder of this test session that every pytest-xdist worker shares (pytest keeps the
  last few sessions' and removes older ones)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root  # <session>/popen-gwN


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the whole test session, shared by the workers and
  every subprocess they start: many tests compile the same tiny programs. A size limit turns
  on the cache's file lock, so that no process reads an entry being written."""
  settings = {
      'jax_compilation_cache_dir': str(session_root(tmp_path_factory) / 'jax_cache'),
      'jax_persistent_cache_min_compile_time_secs': 0.2,
      'jax_compilation_cache_max_size': 8 << 30,
  }
  for name, value in settings.items():
    os.environ.setdefault(name.upper(), str(value))  # (subprocesses)
    jax.config.update(name, type(value)(os.environ[name.upper()]))


def built_once(tmp_path_factory, name, build):
  """`build(folder)` run once per test session, however many pytest-xdist workers ask for it.

  The first worker to ask builds into a folder that every worker of the session shares, under a
  file lock; the others wait for the lock and reuse the folder. Returns (folder, what build
  returned, which must be JSON). A build that failed (raised) is cleared and tried again by the
  next worker that asks, which then reports its own failure. Tests put their outputs under
  their own tmp_path; what one does in the shared folder leaves it as the others read it (a
  re-run that trains nothing, another dataset prepared beside the others).
  """
  shared = session_root(tmp_path_factory) / 'built_once'
  shared.mkdir(exist_ok=True)
  folder, record = shared / name, shared / f'{name}.json'
  with open(shared / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not record.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      record.write_text(json.dumps(build(folder)))
    return folder, json.loads(record.read_text())


@pytest.fixture(scope='session')
def mesh1():
  """A one-device mesh: the unsharded reference."""
  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope='session')
def mesh22():
  """data=2 x fsdp=2 over the 4 simulated devices."""
  assert jax.device_count() == 4, 'tests expect 4 simulated CPU devices'
  return sharding.make_mesh(data=2, fsdp=2, tensor=1)
