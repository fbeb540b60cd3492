"""Memory planning: the real train step of a config, compiled ahead of time on abstract inputs.

    plan = planner.plan(config, devices=jax.devices()[:64], per_device_batch=8, seconds=30)
    plan.fits('v5e'), plan.per_device_bytes['total']

The model, optimizer state and batch are `jax.ShapeDtypeStruct`s with the shardings training
would give them (`nnx.get_abstract_model`, nothing is allocated); the step is the one
`train_step.make_train_step` builds, lowered and compiled for the mesh, and the compiler's own
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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tpa_jax import costs, features, losses, models, optim, partition, sharding, train_step

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


def parse_mesh(text: str, num_devices: int) -> dict[str, int]:
  """'data=2,fsdp=-1' -> {'data': 2, 'fsdp': num_devices // 2, 'tensor': 1}, checked against
  the device count (named errors, before anything is built)."""
  sizes = {'data': 1, 'fsdp': 1, 'tensor': 1}
  for part in filter(None, text.split(',')):
    name, _, value = part.partition('=')
    name = name.strip()
    if name not in sizes:
      raise ValueError(f'mesh axis {name!r} in --mesh={text!r}: accepted axes are '
                       f'{sharding.MESH_AXES}')
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f'mesh axis {name}={value!r} in --mesh={text!r}: accepted sizes are '
                       'positive integers or -1 (the remaining devices)') from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise ValueError(f'mesh axis {name}={value} in --mesh={text!r}: accepted sizes are '
                       'positive integers or -1 (the remaining devices)')
  auto = [k for k, v in sizes.items() if v == -1]
  if len(auto) > 1:
    raise ValueError(f'--mesh={text!r}: only one axis may be -1, got {auto}')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  if (auto and num_devices % fixed) or (not auto and fixed != num_devices):
    raise ValueError(f'--mesh={text!r} does not divide {num_devices} devices: its fixed axes '
                     f'multiply to {fixed}; accepted: sizes multiplying to {num_devices}, or to '
                     f'one of {divisors} with one axis -1')
  if auto:
    sizes[auto[0]] = num_devices // fixed
  return sizes


def optimizer_from_config(config: ml_collections.ConfigDict):
  """(optimizer, schedule) as training builds them from `config.optim`."""
  o = config.optim
  return optim.make_optimizer(
      learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
      decay_steps=config.train.num_steps, end_ratio=o.end_ratio, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


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
                     featurizer: features.Featurizer | None = None) -> train_step.Trainer:
  """The trainer `train_step.create_trainer` would build for `config` on `mesh`, with every
  array a sharded ShapeDtypeStruct: the same step function, shardings and dtypes, nothing
  allocated. Its `lower(batch)` lowers the real step."""
  task = config.head.kind
  if task not in losses.TASKS:
    raise ValueError(f'head.kind={task!r}: accepted values are {losses.TASKS}')
  rules = sharding.validate_rules(sharding.DEFAULT_RULES)
  with sharding.axis_rules(rules):
    graphdef, abstract = sharding.abstract_model(
        lambda: models.build_model(config, seed=config.seed), mesh)
  model = nnx.merge(graphdef, abstract)
  graphdef, trainable, frozen, rest = partition.split(model, config.train.trainable)
  frozen_depth = model.frozen_depth(trainable)
  frozen_dtype = models.dtype(config.train.frozen_dtype, 'train.frozen_dtype')
  # Frozen weights are stored in `frozen_dtype`, as create_trainer casts them.
  frozen = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, frozen_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
          sharding=x.sharding), frozen)
  optimizer, schedule = optimizer_from_config(config)
  with sharding.axis_rules(rules):
    trainable_sh = train_step.tree_shardings(trainable, mesh)
    frozen_sh = train_step.tree_shardings(frozen, mesh)
    rest_sh = train_step.tree_shardings(rest, mesh)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    opt_sh = train_step.tree_shardings(opt_state, mesh)
  replicated = NamedSharding(mesh, P())
  state = train_step.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
      trainable=_with_shardings(trainable, trainable_sh),
      opt_state=_with_shardings(opt_state, opt_sh))
  frozen, rest = _with_shardings(frozen, frozen_sh), _with_shardings(rest, rest_sh)
  for what, tree in (('trainable weight', state.trainable), ('frozen weight', frozen),
                     ('optimizer state', state.opt_state)):
    _check_divisible(tree, mesh, what)
  grad_accum_steps = config.train.grad_accum_steps
  step_fn = train_step.make_train_step(
      graphdef, optimizer, schedule, task=task, frozen_depth=frozen_depth, rules=rules,
      featurizer=featurizer, seed=config.seed, grad_accum_steps=grad_accum_steps)
  state_sh = train_step.TrainState(step=replicated, trainable=trainable_sh, opt_state=opt_sh)
  return train_step.Trainer(
      graphdef=graphdef, state=state, frozen=frozen, rest=rest, mesh=mesh,
      frozen_depth=frozen_depth, state_shardings=state_sh, frozen_shardings=frozen_sh,
      rest_shardings=rest_sh, step_fn=step_fn, rules=rules, task=task, featurizer=featurizer,
      grad_accum_steps=grad_accum_steps)


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
  else:
    batch['labels'] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return batch


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
  featurizer = features.Featurizer.from_config(config.features)
  if featurizer.num_mels != config.model.frontend.input_dim:
    raise ValueError(f'features.num_mels={featurizer.num_mels} must equal '
                     f'model.frontend.input_dim={config.model.frontend.input_dim}')
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
