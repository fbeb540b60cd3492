"""The adapter-only sharded train step: one pure function under `jax.jit`.

    graphdef, trainable, frozen, rest = split(model)
    x = prefix(frozen, batch)                         # frontend + blocks below the lowest adapter
    grads = grad(loss(suffix(trainable, frozen, x)))  # autodiff sees only the adapted segment
    trainable, opt_state = optax update over trainable only

Full fine-tuning is the same function with the trainable filter 'full'. Frozen weights are a
non-differentiated argument: no gradient, optimizer state or all-reduce exists for them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from tpa_jax import sharding
from tpa_jax.audio.featurizer import Featurizer
from tpa_jax.data.batches import batch_inputs
from tpa_jax.errors import ConfigError
from tpa_jax.nn.model import SpeechModel
from tpa_jax.train import losses

class TrainState(struct.PyTreeNode):
  """What a train step updates (and donates): the step, trainable weights, optimizer state."""
  step: jax.Array
  trainable: nnx.State
  opt_state: Any


# Metrics summed over micro-batches; the others are averaged with the loss's weights.
_SUMMED_METRICS = ('tokens', 'masked_frames')


def loss_weight(task: str, aux: dict[str, jax.Array], batch_size: int) -> jax.Array:
  """What a batch's loss is an average over: CTC label tokens (`losses.ctc_loss` divides by
  them) or utterances. Accumulating weight x loss and dividing by the summed weights gives the
  loss, and the gradient, of all the micro-batches taken as one batch."""
  if task == 'ctc':
    return aux['tokens']
  if task == 'best_rq':
    return aux['masked_frames']  # the masked-prediction loss is a mean over masked frames
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
    raise ConfigError(f'train.grad_accum_steps={grad_accum_steps!r}: accepted values are '
                     'positive integers')

  def loss_and_grads(trainable, frozen, rest, batch, key):
    model: SpeechModel = nnx.merge(graphdef, trainable, frozen, rest)
    if task == 'best_rq':
      # BEST-RQ: targets from the clean features (no SpecAugment: masking with noise is the
      # augmentation), then masked spans keyed by (seed, step, micro-batch).
      features, mask = batch_inputs(batch, featurizer)
      features, targets = model.head.prepare(jax.random.fold_in(key, 1), features, mask)
      batch = {**batch, **targets}
    else:
      features, mask = batch_inputs(batch, featurizer, key)
    # The frozen prefix is computed before autodiff starts: it is never differentiated.
    x, mask = model.prefix(features, mask, frozen_depth)
    blocks_frozen = not SpeechModel.blocks_train(trainable)

    def loss_fn(trainable):
      model = nnx.merge(graphdef, trainable, frozen, rest)
      logits, out_mask = model.suffix(x, mask, frozen_depth, blocks_frozen=blocks_frozen)
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
      rate = (schedule.in_step(state.opt_state, state.step) if hasattr(schedule, 'in_step')
              else schedule(state.step))
      metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': rate,
                 'applied': ok.astype(jnp.float32), **aux}
    return new_state, metrics

  return train_step
