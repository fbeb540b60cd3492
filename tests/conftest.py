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


def trained_task(method: str, overrides: dict, mesh, seed: int = 3, base_seed: int = 0):
  """(config, model, spec, export tensors) of a task whose adapters and head look trained
  (noise added to them) over the tiny base of `base_seed`; spec over base fingerprint 'base-fp'."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tpa_jax.checkpoint import spec as spec_lib  # pylint: disable=import-outside-toplevel
  from tpa_jax.infer.export import flat_arrays  # pylint: disable=import-outside-toplevel
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
