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

from tpa_jax import features as features_lib
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
    features, mask = _featurize_rows(featurizer, batch['audio'], batch['audio_lengths'])
    if key is not None and featurizer.spec_augment:
      # As Featurizer.__call__ with a key: SpecAugment on the normalised features, drawn for
      # the whole batch, so the masks do not depend on how the batch is split.
      f = featurizer
      features = features_lib.spec_augment(
          key, features, mask, num_freq_masks=f.num_freq_masks, max_freq_width=f.max_freq_width,
          num_time_masks=f.num_time_masks, max_time_fraction=f.max_time_fraction,
          max_time_width=f.max_time_width)
    return features, mask
  return batch['features'], batch['feature_mask']


def _featurize_rows(featurizer: Featurizer, audio_bs: jax.Array,
                    lengths_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Features of each device's rows, computed on that device (they are per utterance). Left to
  the partitioner, the FFT gathers the whole global batch onto every device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return featurizer(audio_bs, lengths_b)
  rows = sharding.logical_to_spec(('batch',), mesh_axis_names=mesh.axis_names)[0]
  return jax.shard_map(lambda a, n: featurizer(a, n), mesh=mesh,
                       in_specs=(P(rows, None), P(rows)),
                       out_specs=(P(rows, None, None), P(rows, None)))(audio_bs, lengths_b)


# Metrics summed over micro-batches; the others are averaged with the loss's weights.
_SUMMED_METRICS = ('tokens',)


def loss_weight(task: str, aux: dict[str, jax.Array], batch_size: int) -> jax.Array:
  """What a batch's loss is an average over: CTC label tokens (`losses.ctc_loss` divides by
  them) or utterances. Accumulating weight x loss and dividing by the summed weights gives the
  loss, and the gradient, of all the micro-batches taken as one batch."""
  if task == 'ctc':
    return aux['tokens']
  return jnp.asarray(batch_size, jnp.float32)


def split_micro_batches(batch: dict[str, jax.Array], steps: int) -> dict[str, jax.Array]:
  """[B, ...] -> [steps, B / steps, ...], micro-batch j holding rows j, j + steps, ... so that
  each keeps the batch's split over the data-parallel devices (no data moves between them)."""
  def split(x):
    x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return {k: split(v) for k, v in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, task: str, frozen_depth: int | None,
                    rules=sharding.DEFAULT_RULES, featurizer: Featurizer | None = None,
                    seed: int = 0, grad_accum_steps: int = 1) -> Callable:
  """The pure step (state, frozen, rest, batch) -> (state, metrics). Audio batches are
  featurized inside it, with SpecAugment keyed by (seed, step).

  With `grad_accum_steps` > 1 the batch is split into that many micro-batches, run one after
  another by a `lax.scan` (each featurized, with SpecAugment keyed by (seed, step, micro-batch),
  and differentiated on its own, so activations of one micro-batch are live at a time); their
  gradients are summed with the weights of `loss_weight` before one optimizer update.
  """
  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f'train.grad_accum_steps={grad_accum_steps!r}: accepted values are '
                     'positive integers')

  def loss_and_grads(trainable, frozen, rest, batch, key):
    model: SpeechModel = nnx.merge(graphdef, trainable, frozen, rest)
    # The frozen prefix is computed before autodiff starts: it is never differentiated.
    features, mask = batch_inputs(batch, featurizer, key)
    x, mask = model.prefix(features, mask, frozen_depth)

    def loss_fn(trainable):
      model = nnx.merge(graphdef, trainable, frozen, rest)
      logits, out_mask = model.suffix(x, mask, frozen_depth)
      return losses.task_loss(task, logits, out_mask, batch)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return loss, aux, grads

  def accumulated(trainable, frozen, rest, batch, key):
    micro = split_micro_batches(batch, grad_accum_steps)
    micro_size = next(iter(batch.values())).shape[0] // grad_accum_steps

    def body(carry, xs):
      index, micro_batch = xs
      loss, aux, grads = loss_and_grads(trainable, frozen, rest, micro_batch,
                                        jax.random.fold_in(key, index))
      weight = loss_weight(task, aux, micro_size)
      grad_sum, sums = carry
      grad_sum = jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads)
      sums = {'weight': sums['weight'] + weight, 'loss': sums['loss'] + weight * loss,
              **{k: sums[k] + (v if k in _SUMMED_METRICS else weight * v)
                 for k, v in aux.items()}}
      return (grad_sum, sums), None

    # The accumulators' structure comes from one abstract evaluation of a micro-batch.
    _, aux_shape, _ = jax.eval_shape(
        loss_and_grads, trainable, frozen, rest, jax.tree.map(lambda x: x[0], micro), key)
    zero = jnp.zeros((), jnp.float32)
    sums = {'weight': zero, 'loss': zero, **{k: zero for k in aux_shape}}
    grad_sum = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    (grad_sum, sums), _ = jax.lax.scan(
        body, (grad_sum, sums), (jnp.arange(grad_accum_steps), micro))
    # Every micro-batch without CTC labels has weight 0, as its loss has in the batch's mean.
    total = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree.map(lambda g, t: (g / total).astype(t.dtype), grad_sum, trainable)
    aux = {k: sums[k] if k in _SUMMED_METRICS else sums[k] / total for k in aux_shape}
    return sums['loss'] / total, aux, grads

  def train_step(state: TrainState, frozen: nnx.State, rest: nnx.State,
                 batch: dict[str, jax.Array]):
    with sharding.axis_rules(rules):
      key = jax.random.fold_in(jax.random.key(seed), state.step)
      if grad_accum_steps == 1:
        loss, aux, grads = loss_and_grads(state.trainable, frozen, rest, batch, key)
      else:
        loss, aux, grads = accumulated(state.trainable, frozen, rest, batch, key)
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
  grad_accum_steps: int = 1
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
    rows = batch[keys[0]]
    size = rows.shape[0]
    # With several processes a host batch holds this process's rows of the global batch.
    if jax.process_count() > 1 and not (isinstance(rows, jax.Array)
                                        and not rows.is_fully_addressable):
      size *= jax.process_count()
    if self.grad_accum_steps > 1:
      multiple = self.grad_accum_steps * data_ways
      if size % multiple:
        raise ValueError(
            f'batch size {size} is not divisible by train.grad_accum_steps x the data-parallel '
            f'mesh axes data x fsdp = {self.grad_accum_steps} x {data_ways} = {multiple}; use a '
            f'multiple of {multiple}')
    elif size % data_ways:
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
                   seed: int = 0, grad_accum_steps: int = 1) -> Trainer:
  """Splits a (sharded) model, stores frozen weights in `frozen_dtype`, initialises the optimizer
  on trainable state only, and prepares the jitted step (accumulating the gradients of
  `grad_accum_steps` micro-batches per update)."""
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
                            rules=rules, featurizer=featurizer, seed=seed,
                            grad_accum_steps=grad_accum_steps)
  return Trainer(graphdef=graphdef, state=state, frozen=frozen, rest=rest, mesh=mesh,
                 frozen_depth=frozen_depth, state_shardings=state_sh,
                 frozen_shardings=frozen_sh, rest_shardings=rest_sh, step_fn=step_fn,
                 rules=rules, task=task, featurizer=featurizer,
                 grad_accum_steps=grad_accum_steps)
