"""The adapter-only sharded train step: one pure function under `jax.jit`.

    graphdef, trainable, frozen, rest = split(model)
    x = prefix(frozen, batch)                         # frontend + blocks below the lowest adapter
    grads = grad(loss(suffix(trainable, frozen, x)))  # autodiff sees only the adapted segment
    trainable, opt_state = optax update over trainable only

Full fine-tuning is the same function with the trainable filter 'full'. Frozen weights are a
non-differentiated argument: no gradient, optimizer state or all-reduce exists for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from tpa_jax import losses, partition, sharding
from tpa_jax.features import Featurizer
from tpa_jax.nn.model import SpeechModel

# A batch carries either features or audio (featurized inside the step).
INPUT_KEYS = (('features', 'feature_mask'), ('audio', 'audio_lengths'))


class TrainState(struct.PyTreeNode):
  """What a train step updates (and donates): the step, trainable weights, optimizer state."""
  step: jax.Array
  trainable: nnx.State
  opt_state: Any


def tree_shardings(tree, mesh: jax.sharding.Mesh):
  """NamedShardings for a tree of Variables (from their logical axes) and plain arrays
  (replicated). Optimizer moments keep their parameter's Variable type and metadata."""
  def leaf_sharding(x):
    if isinstance(x, nnx.Variable):
      return x.replace(NamedSharding(mesh, sharding.variable_spec(x, mesh)))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shardings(batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  """Every batch array is split on its leading (batch) axis over the data-parallel mesh axes."""
  return {k: sharding.named(mesh, ('batch',) + (None,) * (len(v.shape) - 1))
          for k, v in batch.items()}


def batch_inputs(batch: dict[str, jax.Array], featurizer: Featurizer | None,
                 key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(features, mask) of a batch: given, or computed from `audio` on device (SpecAugment when
  `key` is given)."""
  if 'audio' in batch:
    if featurizer is None:
      raise ValueError('a batch with audio needs a featurizer (config.features)')
    return featurizer(batch['audio'], batch['audio_lengths'], key)
  return batch['features'], batch['feature_mask']


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, task: str, frozen_depth: int | None,
                    rules=sharding.DEFAULT_RULES, featurizer: Featurizer | None = None,
                    seed: int = 0) -> Callable:
  """The pure step (state, frozen, rest, batch) -> (state, metrics). Audio batches are
  featurized inside it, with SpecAugment keyed by (seed, step)."""

  def train_step(state: TrainState, frozen: nnx.State, rest: nnx.State,
                 batch: dict[str, jax.Array]):
    with sharding.axis_rules(rules):
      model: SpeechModel = nnx.merge(graphdef, state.trainable, frozen, rest)
      # The frozen prefix is computed before autodiff starts: it is never differentiated.
      features, mask = batch_inputs(batch, featurizer,
                                    jax.random.fold_in(jax.random.key(seed), state.step))
      x, mask = model.prefix(features, mask, frozen_depth)

      def loss_fn(trainable):
        model = nnx.merge(graphdef, trainable, frozen, rest)
        logits, out_mask = model.suffix(x, mask, frozen_depth)
        return losses.task_loss(task, logits, out_mask, batch)

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
      grad_norm = optax.tree.norm(grads)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
      trainable = optax.apply_updates(state.trainable, updates)
      # A non-finite loss or gradient leaves the state as it was; `applied` reports it.
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      new_state = TrainState(step=state.step + 1, trainable=keep(trainable, state.trainable),
                             opt_state=keep(opt_state, state.opt_state))
      metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': schedule(state.step),
                 'applied': ok.astype(jnp.float32), **aux}
    return new_state, metrics

  return train_step


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
      raise ValueError('an audio batch needs a trainer with a featurizer (config.features)')
    losses.check_labels(self.task, batch)
    data_ways = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    size = batch[keys[0]].shape[0]
    if size % data_ways:
      raise ValueError(f'batch size {size} is not divisible by the data-parallel mesh axes '
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
    """The current model (trainable + frozen + rest) for evaluation."""
    return nnx.merge(self.graphdef, self.state.trainable, self.frozen, self.rest)


def create_trainer(model: SpeechModel, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, *, task: str, trainable: str = 'adapters',
                   frozen_dtype=None, mesh: jax.sharding.Mesh,
                   rules=sharding.DEFAULT_RULES, featurizer: Featurizer | None = None,
                   seed: int = 0) -> Trainer:
  """Splits a (sharded) model, stores frozen weights in `frozen_dtype`, initialises the optimizer
  on trainable state only, and prepares the jitted step."""
  if task not in losses.TASKS:
    raise ValueError(f'head.kind={task!r}: accepted values are {losses.TASKS}')
  rules = sharding.validate_rules(rules)
  graphdef, trainable_state, frozen, rest = partition.split(model, trainable)
  frozen_depth = model.frozen_depth(trainable_state)
  with sharding.axis_rules(rules):
    trainable_sh = tree_shardings(trainable_state, mesh)
    frozen_sh = tree_shardings(frozen, mesh)
    rest_sh = tree_shardings(rest, mesh)
    opt_sh = tree_shardings(jax.eval_shape(optimizer.init, trainable_state), mesh)
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh):
    if frozen_dtype is not None:
      frozen = jax.jit(lambda f: partition.cast(f, frozen_dtype), out_shardings=frozen_sh,
                       donate_argnums=0)(frozen)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(trainable_state)
    step0 = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  state = TrainState(step=step0, trainable=trainable_state, opt_state=opt_state)
  state_sh = TrainState(step=replicated, trainable=trainable_sh, opt_state=opt_sh)
  step_fn = make_train_step(graphdef, optimizer, schedule, task=task, frozen_depth=frozen_depth,
                            rules=rules, featurizer=featurizer, seed=seed)
  return Trainer(graphdef=graphdef, state=state, frozen=frozen, rest=rest, mesh=mesh,
                 frozen_depth=frozen_depth, state_shardings=state_sh,
                 frozen_shardings=frozen_sh, rest_shardings=rest_sh, step_fn=step_fn,
                 rules=rules, task=task, featurizer=featurizer)
