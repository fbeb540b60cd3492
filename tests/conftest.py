"""Test harness: 4 simulated CPU devices (set before jax is imported) and small shared helpers."""

import json
import os

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


def logged_steps(workdir):
  """Steps of the complete lines of a run's metrics.jsonl (a killed run may leave a torn one)."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(line)['step'] for line in f if line.endswith('\n')]
  except FileNotFoundError:
    return []


@pytest.fixture(scope='session')
def mesh1():
  """A one-device mesh: the unsharded reference."""
  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope='session')
def mesh22():
  """data=2 x fsdp=2 over the 4 simulated devices."""
  assert jax.device_count() == 4, 'tests expect 4 simulated CPU devices'
  return sharding.make_mesh(data=2, fsdp=2, tensor=1)
