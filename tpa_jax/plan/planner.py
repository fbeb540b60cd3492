"""Memory planning: the real train step of a config, compiled ahead of time on abstract inputs.

    plan = planner.plan(config, devices=jax.devices()[:64], per_device_batch=8, seconds=30)
    plan.fits('v5e'), plan.per_device_bytes['total']

The model, optimizer state and batch are `jax.ShapeDtypeStruct`s with the shardings training
would give them (`trainer.from_config(..., abstract=True)`, nothing is allocated); the step is
the one training runs, lowered and compiled for the mesh, and the compiler's own
memory analysis of that program gives the per-device bytes. Batches hold int16 audio, so the
log-mel features are computed on device as in training. On simulated CPU devices the numbers are
those of XLA's CPU compiler for the sharded program: a plan, not a TPU measurement.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from tpa_jax import sharding
from tpa_jax.audio.featurizer import Featurizer, featurizer as make_featurizer
from tpa_jax.plan import costs
from tpa_jax.sharding import parse_mesh
from tpa_jax.train import partition
from tpa_jax.train import trainer as trainer_lib

GIB = 2 ** 30
# Memory per chip. TPUs in GiB of HBM, GPUs as sold (GB).
ACCELERATORS = {
    'v4': 32 * GIB,
    'v5e': 16 * GIB,
    'v5p': 95 * GIB,
    'v6e': 32 * GIB,
    'h100': 80 * 10 ** 9,
    'h200': 141 * 10 ** 9,
}
# XLA's CPU backend computes bf16 dots in f32, and loop-invariant code motion then hoists an f32
# copy of every stacked frozen weight out of the layer scan: twice the bf16 weights' memory
# that a TPU, computing in bf16, never holds. The plan compiles without that pass.
PLAN_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}
# Fsdp over every device: each device keeps 1/n of every weight and of the optimizer state, and
# the batch splits over the same axis.
DEFAULT_MESH = 'data=1,fsdp=-1,tensor=1'


def accelerator_bytes(name: str) -> int:
  """Memory of one chip of accelerator `name`."""
  if name not in ACCELERATORS:
    raise ValueError(f'accelerator {name!r}: accepted values are {tuple(ACCELERATORS)}')
  return ACCELERATORS[name]


def _check_divisible(tree, mesh: jax.sharding.Mesh, what: str) -> None:
  """A named error for a weight whose sharded dimension the mesh does not divide."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = leaf.sharding.spec
    for dim, axes in zip(leaf.shape, spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      ways = math.prod(mesh.shape[a] for a in axes)
      if dim % ways:
        name = '.'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path
                        if getattr(k, 'name', None) != 'value')
        raise ValueError(f'{what} {name} of shape {leaf.shape} splits a dimension of {dim} over '
                         f'mesh axes {axes} = {ways} devices, which does not divide it; use a '
                         f'mesh whose {"x".join(axes)} size divides {dim}')


def abstract_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     featurizer: Featurizer | None = None) -> trainer_lib.Trainer:
  """The trainer `launch/train.py` builds for `config` on `mesh` (`trainer.from_config`), with
  every array a sharded ShapeDtypeStruct: the same step function, shardings and dtypes,
  nothing allocated; named errors for weights the mesh cannot split."""
  trainer = trainer_lib.from_config(config, mesh, abstract=True, featurizer=featurizer)
  for what, tree in (('trainable weight', trainer.state.trainable),
                     ('frozen weight', trainer.frozen),
                     ('optimizer state', trainer.state.opt_state)):
    _check_divisible(tree, mesh, what)
  return trainer


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int,
                   seconds: float) -> dict[str, jax.ShapeDtypeStruct]:
  """A speech batch of `batch_size` utterances of `seconds` of int16 audio, with as many CTC
  label slots as the data pipeline gives that length (`data.max_tokens_per_second`)."""
  samples = int(round(seconds * config.features.sample_rate_hz))
  batch = {'audio': jax.ShapeDtypeStruct((batch_size, samples), jnp.int16),
           'audio_lengths': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  if config.head.kind == 'ctc':
    slots = max(int(seconds * config.data.max_tokens_per_second), 1)
    batch['labels'] = jax.ShapeDtypeStruct((batch_size, slots), jnp.int32)
    batch['label_mask'] = jax.ShapeDtypeStruct((batch_size, slots), jnp.bool_)
  elif config.head.kind == 'classification':
    batch['labels'] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return batch  # (BEST-RQ pre-training: audio only, its targets come from the audio)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device memory and FLOPs of one train step of a config on a mesh."""
  devices: int
  mesh: dict
  batch_size: int  # global, per optimizer step
  per_device_batch: int  # utterances per device per micro-batch
  seconds: float
  grad_accum_steps: int
  # weights (trainable + frozen + rest), gradients, optimizer, temp (everything else the
  # compiled step holds: activations, the batch and its features, gathered weights, workspace)
  # and their total, the compiler's peak estimate.
  per_device_bytes: dict
  # The compiler's memory analysis: argument, output, alias and temp bytes per device.
  compiled_bytes: dict
  flops_per_step: float | None  # all devices together, every layer counted
  trainable_params: int
  total_params: int
  compile_seconds: float

  def fits(self, accelerator: str) -> bool:
    return self.per_device_bytes['total'] <= accelerator_bytes(accelerator)

  def to_json(self, accelerator: str | None = None) -> dict:
    out = dataclasses.asdict(self)
    if accelerator is not None:
      out.update(accelerator=accelerator, accelerator_bytes=accelerator_bytes(accelerator),
                 fits=self.fits(accelerator))
    return out


def check_batch_size(config: ml_collections.ConfigDict, mesh_sizes: dict,
                     per_device_batch: int) -> int:
  """The global batch: per_device_batch x data ways x grad_accum_steps, or (per_device_batch
  0) `train.batch_size`, which must then divide over them (named errors before compiling)."""
  data_ways = mesh_sizes['data'] * mesh_sizes['fsdp']
  steps = config.train.grad_accum_steps
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f'train.grad_accum_steps={steps!r}: accepted values are positive integers')
  if per_device_batch < 0:
    raise ValueError(f'per_device_batch={per_device_batch}: accepted values are positive '
                     'integers, or 0 for train.batch_size')
  if per_device_batch:
    return per_device_batch * data_ways * steps
  size = config.train.batch_size
  if size < 1 or size % (data_ways * steps):
    raise ValueError(f'train.batch_size={size} does not divide over grad_accum_steps x data x '
                     f'fsdp = {steps} x {data_ways}; accepted: multiples of {steps * data_ways}')
  return size


def plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
         mesh: str = DEFAULT_MESH, per_device_batch: int = 8, seconds: float = 30.0,
         count_flops: bool = True) -> Plan:
  """Compiles the train step of `config` for a mesh over `devices` (shapes only) and returns its
  per-device memory; `count_flops` also lowers the step with the layer loop unrolled (one
  micro-batch) to count the FLOPs of every layer."""
  mesh_sizes = parse_mesh(mesh, len(devices))
  batch_size = check_batch_size(config, mesh_sizes, per_device_batch)
  if seconds <= 0:
    raise ValueError(f'seconds={seconds}: accepted values are positive numbers')
  featurizer = make_featurizer(config)
  jax_mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
  trainer = abstract_trainer(config, jax_mesh, featurizer)
  batch = abstract_batch(config, batch_size, seconds)

  start = time.perf_counter()
  compiled = trainer.lower(batch).compile(compiler_options=PLAN_COMPILER_OPTIONS)
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  compiled_bytes = {'argument': int(memory.argument_size_in_bytes),
                    'output': int(memory.output_size_in_bytes),
                    'alias': int(memory.alias_size_in_bytes),
                    'temp': int(memory.temp_size_in_bytes)}
  state = costs.weight_state_bytes(trainer)
  total = (compiled_bytes['argument'] + compiled_bytes['output'] - compiled_bytes['alias'] +
           compiled_bytes['temp'])
  weights = state['trainable'] + state['frozen'] + costs.per_device_bytes(trainer.rest)
  per_device = {'weights': weights, 'gradients': state['gradients'],
                'optimizer': state['optimizer']}
  per_device['temp'] = total - sum(per_device.values())
  per_device['total'] = total

  flops = None
  if count_flops:
    flops = _flops_per_step(config, jax_mesh, featurizer, batch_size, seconds)
  trainable_params = partition.count_params(trainer.state.trainable)
  return Plan(devices=len(devices), mesh=dict(jax_mesh.shape), batch_size=batch_size,
              per_device_batch=batch_size // (config.train.grad_accum_steps *
                                              mesh_sizes['data'] * mesh_sizes['fsdp']),
              seconds=seconds, grad_accum_steps=config.train.grad_accum_steps,
              per_device_bytes=per_device, compiled_bytes=compiled_bytes, flops_per_step=flops,
              trainable_params=trainable_params,
              total_params=trainable_params + partition.count_params(trainer.frozen),
              compile_seconds=compile_seconds)


def _flops_per_step(config, mesh, featurizer, batch_size: int, seconds: float) -> float:
  """FLOPs of the lowered step with the layer loop unrolled (a scan body counts once) on one
  micro-batch, times the micro-batches of a step."""
  steps = config.train.grad_accum_steps
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  unrolled.train.grad_accum_steps = 1
  trainer = abstract_trainer(unrolled, mesh, featurizer)
  lowered = trainer.lower(abstract_batch(config, batch_size // steps, seconds))
  return costs.lowered_flops(lowered) * steps


def smallest_fitting(plans: Sequence[Plan], accelerator: str) -> int | None:
  """The fewest devices among `plans` on which the step fits `accelerator`."""
  fitting = [p.devices for p in plans if p.fits(accelerator)]
  return min(fitting) if fitting else None


def format_table(plans: Sequence[Plan], accelerators: Sequence[str] = tuple(ACCELERATORS)) -> str:
  """One row per plan: per-device GiB of each part, and whether it fits each accelerator."""
  parts = ('weights', 'gradients', 'optimizer', 'temp', 'total')
  header = (f'{"devices":>7} {"mesh (data,fsdp,tensor)":>23} {"batch":>6} ' +
            ' '.join(f'{p:>9}' for p in parts) + '  ' +
            ' '.join(f'{a:>5}' for a in accelerators) + f' {"TFLOPs":>9}')
  lines = [f'per-device GiB; fits: total <= the chip\'s memory', header]
  for plan_ in plans:
    mesh = ','.join(str(plan_.mesh[a]) for a in sharding.MESH_AXES)
    flops = f'{plan_.flops_per_step / 1e12:9.1f}' if plan_.flops_per_step else f'{"-":>9}'
    lines.append(
        f'{plan_.devices:>7} {mesh:>23} {plan_.batch_size:>6} ' +
        ' '.join(f'{plan_.per_device_bytes[p] / GIB:9.2f}' for p in parts) + '  ' +
        ' '.join(f'{"yes" if plan_.fits(a) else "no":>5}' for a in accelerators) + f' {flops}')
  return '\n'.join(lines)
