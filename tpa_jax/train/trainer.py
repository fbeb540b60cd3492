"""The trainer: a model split by what trains, its sharded state and the jitted step, built once
for training, evaluation, exports, the planner and the benchmarks.

`from_config(config, mesh)` builds it from a config. The model's variables start as abstract
shapes with their shardings: the frozen encoder is restored from `config.base.path` straight
into its shards in the dtype it is stored in (no frozen weight is ever initialised, and no f32
copy of a bf16 base exists), and only what the base does not hold (adapters, head) is
initialised. Without a base every weight is initialised from `config.seed`. With
`abstract=True` nothing is allocated: every array is a sharded ShapeDtypeStruct, and
`lower(batch)` lowers the real step (the planner).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tpa_jax import checkpoint, sharding
from tpa_jax.audio import featurizer as featurizer_lib
from tpa_jax.audio.featurizer import Featurizer
from tpa_jax.data.batches import INPUT_KEYS, batch_shardings
from tpa_jax.errors import ConfigError
from tpa_jax.nn import best_rq, build
from tpa_jax.nn.model import SpeechModel
from tpa_jax.nn.params import AdapterParam
from tpa_jax.train import losses, optim, partition, validation
from tpa_jax.train.step import TrainState, make_train_step


def tree_shardings(tree, mesh: jax.sharding.Mesh):
  """NamedShardings for a tree of Variables (from their logical axes) and plain arrays
  (replicated). Optimizer moments keep their parameter's Variable type and metadata."""
  def leaf_sharding(x):
    if isinstance(x, nnx.Variable):
      return x.replace(NamedSharding(mesh, sharding.variable_spec(x, mesh)))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass
class Trainer:
  """A model split for training on a mesh, with its sharded state and the jitted step."""
  graphdef: nnx.GraphDef
  state: TrainState
  frozen: nnx.State
  rest: nnx.State
  mesh: jax.sharding.Mesh
  frozen_depth: int | None
  state_shardings: TrainState
  frozen_shardings: nnx.State
  rest_shardings: nnx.State
  step_fn: Callable
  rules: tuple
  task: str
  featurizer: Featurizer | None = None
  grad_accum_steps: int = 1
  # The fingerprint of the base the frozen weights came from (None for abstract trainers).
  base_fingerprint: dict | None = None
  _executables: dict = dataclasses.field(default_factory=dict, repr=False)

  def _jitted(self, batch):
    return jax.jit(self.step_fn,
                   in_shardings=(self.state_shardings, self.frozen_shardings,
                                 self.rest_shardings, batch_shardings(batch, self.mesh)),
                   out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
                   donate_argnums=(0,))

  def check_batch(self, batch: dict[str, Any]) -> None:
    """Named errors for a batch the step cannot take, before anything is compiled."""
    keys = next((keys for keys in INPUT_KEYS if keys[0] in batch), INPUT_KEYS[0])
    for key in keys:
      if key not in batch:
        raise KeyError(f'a batch needs {key!r} (or {INPUT_KEYS[1]} for audio); it has '
                       f'{sorted(batch)}')
    if keys[0] == 'audio' and self.featurizer is None:
      raise ConfigError('an audio batch needs a trainer with a featurizer (config.features)')
    losses.check_labels(self.task, batch)
    data_ways = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    rows = batch[keys[0]]
    size = rows.shape[0]
    # With several processes a host batch holds this process's rows of the global batch.
    if jax.process_count() > 1 and not (isinstance(rows, jax.Array)
                                        and not rows.is_fully_addressable):
      size *= jax.process_count()
    if self.grad_accum_steps > 1:
      multiple = self.grad_accum_steps * data_ways
      if size % multiple:
        raise ConfigError(
            f'batch size {size} is not divisible by train.grad_accum_steps x the data-parallel '
            f'mesh axes data x fsdp = {self.grad_accum_steps} x {data_ways} = {multiple}; use a '
            f'multiple of {multiple}')
    elif size % data_ways:
      raise ConfigError(f'batch size {size} is not divisible by the data-parallel mesh axes '
                       f'data x fsdp = {data_ways}; use a multiple of {data_ways}')

  def lower(self, batch: dict[str, Any]):
    """Lowers the step for `batch` (arrays or ShapeDtypeStructs) without running it."""
    self.check_batch(batch)
    with jax.set_mesh(self.mesh):
      return self._jitted(batch).lower(self.state, self.frozen, self.rest, batch)

  def compile(self, batch: dict[str, Any]):
    """The compiled step for the shapes of `batch`, compiled once per shape (bucket)."""
    key = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))
    if key not in self._executables:
      self._executables[key] = self.lower(batch).compile()
    return self._executables[key]

  def global_batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Global arrays of a batch. With several processes each passes its own rows (the process's
    shard of the global batch), which are concatenated along the batch axis."""
    shardings = batch_shardings(batch, self.mesh)
    if jax.process_count() > 1:
      return {k: v if isinstance(v, jax.Array) and not v.is_fully_addressable else
              jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
    return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}

  def step(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Runs one step on a host batch (this process's rows) or global arrays; updates
    `self.state`."""
    self.check_batch(batch)
    batch = self.global_batch(batch)
    compiled = self.compile(batch)
    with jax.set_mesh(self.mesh):
      self.state, metrics = compiled(self.state, self.frozen, self.rest, batch)
    return metrics

  def model(self) -> SpeechModel:
    """The current model (trainable + frozen + rest) for scoring."""
    return nnx.merge(self.graphdef, self.state.trainable, self.frozen, self.rest)


def _abstract(tree) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


@functools.partial(jax.jit, static_argnames='dtype')
def _astype(x: jax.Array, dtype) -> jax.Array:
  return x.astype(dtype)  # (elementwise: the output keeps the input's sharding)


def _cast_floating(state: nnx.State, dtype) -> nnx.State:
  """Floating leaves in `dtype`: abstract leaves change their dtype; concrete ones are cast one
  array at a time (only those held in another dtype)."""
  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return _astype(x, dtype)
  return jax.tree.map(cast, state)


def create_trainer(model: SpeechModel, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, *, task: str, trainable: str = 'adapters',
                   frozen_dtype=None, mesh: jax.sharding.Mesh,
                   rules=sharding.DEFAULT_RULES, featurizer: Featurizer | None = None,
                   seed: int = 0, grad_accum_steps: int = 1,
                   base_fingerprint: dict | None = None) -> Trainer:
  """Splits a (sharded, or abstract) model, stores frozen weights in `frozen_dtype`, creates the
  optimizer state of the trainable weights only, and prepares the jitted step (accumulating
  the gradients of `grad_accum_steps` micro-batches per update)."""
  if task not in losses.TASKS:
    raise ConfigError(f'head.kind={task!r}: accepted values are {losses.TASKS}')
  rules = sharding.validate_rules(rules)
  graphdef, trainable_state, frozen, rest = partition.split(model, trainable)
  frozen_depth = model.frozen_depth(trainable_state)
  with sharding.axis_rules(rules):
    trainable_sh = tree_shardings(trainable_state, mesh)
    frozen_sh = tree_shardings(frozen, mesh)
    rest_sh = tree_shardings(rest, mesh)
    opt_shape = jax.eval_shape(optimizer.init, trainable_state)
    opt_sh = tree_shardings(opt_shape, mesh)
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh):
    # Trainable state is float32 whatever the base is stored in (full fine-tuning of a bf16 base).
    trainable_state = _cast_floating(trainable_state, jnp.float32)
    if frozen_dtype is not None:
      frozen = _cast_floating(frozen, frozen_dtype)
  if _abstract(trainable_state):
    trainable_state = _with_shardings(trainable_state, trainable_sh)
    frozen, rest = _with_shardings(frozen, frozen_sh), _with_shardings(rest, rest_sh)
    opt_state = _with_shardings(opt_shape, opt_sh)
    step0 = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  else:
    with jax.set_mesh(mesh):
      opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(trainable_state)
      step0 = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  state = TrainState(step=step0, trainable=trainable_state, opt_state=opt_state)
  state_sh = TrainState(step=replicated, trainable=trainable_sh, opt_state=opt_sh)
  step_fn = make_train_step(graphdef, optimizer, schedule, task=task, frozen_depth=frozen_depth,
                            rules=rules, featurizer=featurizer, seed=seed,
                            grad_accum_steps=grad_accum_steps)
  return Trainer(graphdef=graphdef, state=state, frozen=frozen, rest=rest, mesh=mesh,
                 frozen_depth=frozen_depth, state_shardings=state_sh,
                 frozen_shardings=frozen_sh, rest_shardings=rest_sh, step_fn=step_fn,
                 rules=rules, task=task, featurizer=featurizer,
                 grad_accum_steps=grad_accum_steps, base_fingerprint=base_fingerprint)


def _initialise(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model: SpeechModel,
                select: Callable[[SpeechModel], Any]) -> Any:
  """The variables `select(model)` picks, initialised from `config.seed` directly in their
  shards. The rest of the model is traced but not computed: nothing else is allocated."""
  target = select(model)
  shardings = jax.tree.map(lambda a: a.sharding, target)
  rules = sharding.current_rules()

  def init():
    with sharding.axis_rules(rules):
      return select(build.build_model(config, seed=config.seed))

  with jax.set_mesh(mesh):
    # Random-number bound and run once: skip the backend's costly optimisation passes.
    return jax.jit(init, out_shardings=shardings).lower().compile(
        compiler_options={'xla_backend_optimization_level': 0})()


def abstract_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> SpeechModel:
  """The model of `config` with every variable a ShapeDtypeStruct sharded on `mesh`."""
  build.adapter_blocks(config)  # a named error for a bad adapter config before tracing
  return nnx.merge(*sharding.abstract_model(
      lambda: build.build_model(config, seed=config.seed), mesh))


def load_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> SpeechModel:
  """The model of `config` on `mesh`: its encoder restored from `config.base.path` in the
  stored dtypes (adapters and head initialised), or everything initialised when there is no
  base. No host holds the whole model, and no frozen weight is initialised."""
  model = abstract_model(config, mesh)
  if not config.base.path:
    nnx.update(model, _initialise(config, mesh, model, nnx.state))
    return model
  with jax.set_mesh(mesh):
    base = checkpoint.restore_state(config.base.path, checkpoint.base_state(model),
                                    stored_dtype=True)
  nnx.update(model.encoder, base)
  adapters, head = _initialise(config, mesh, model,
                               lambda m: (nnx.state(m, AdapterParam), nnx.state(m.head)))
  nnx.update(model, adapters)
  nnx.update(model.head, head)
  return model


def from_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                model: SpeechModel | None = None, abstract: bool = False,
                featurizer: Featurizer | None = None) -> Trainer:
  """The trainer of `config` on `mesh`: its model loaded as `load_model` does (or `model`; or,
  with `abstract`, shapes only), its optimizer, and the step. Audio batches are featurized as
  `config.features` says (`featurizer` overrides; the random task has none)."""
  if featurizer is None and config.data.name != 'random':
    featurizer = featurizer_lib.featurizer(config)
  fingerprint = None
  if abstract:
    model = abstract_model(config, mesh)
  else:
    model = model if model is not None else load_model(config, mesh)
    fingerprint = checkpoint.base_fingerprint(config.model, model)
  optimizer, schedule = optim.from_config(config)
  return create_trainer(
      model, optimizer, schedule, task=config.head.kind, trainable=config.train.trainable,
      frozen_dtype=build.dtype(config.train.frozen_dtype, 'train.frozen_dtype'), mesh=mesh,
      featurizer=featurizer, seed=config.seed, grad_accum_steps=config.train.grad_accum_steps,
      base_fingerprint=fingerprint)


def check_config(config: ml_collections.ConfigDict, *, mesh: bool = True) -> None:
  """Named errors for every config field a trainer cannot take, before data is prepared or
  anything compiles: the model, adapters, head, what trains, optimizer, features and (with
  `mesh`) the mesh are built from shapes alone on one device."""
  validation.check_config(config)
  if config.head.kind == 'best_rq':
    best_rq.check_config(config)
  if mesh:
    sharding.make_mesh(**config.mesh)  # does the mesh fit the devices?
  from_config(config, sharding.make_mesh(devices=jax.devices()[:1]), abstract=True)
