"""Which variables train: trainable filters by variable type, and the split of a model's state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax.errors import ConfigError
from tpa_jax.nn.params import TRAINABLE, AdapterParam, trainable_filter


def frozen_filter(trainable):
  """Every weight that is not trainable. BatchNorm statistics and other non-Params are `rest`."""
  return nnx.All(nnx.Param, nnx.Not(trainable))


def split(model: nnx.Module, trainable_name: str):
  """(graphdef, trainable, frozen, rest) states of `model` for the filter `trainable_name`."""
  trainable = trainable_filter(trainable_name)
  graphdef, trainable_state, frozen_state, rest_state = nnx.split(
      model, trainable, frozen_filter(trainable), ...)
  if trainable_name == 'adapters' and not jax.tree.leaves(nnx.state(model, AdapterParam)):
    raise ConfigError("train.trainable='adapters' but the model has no adapters "
                     "(adapter.placement='none'); set adapter.placement to one of the placements, "
                     "or train.trainable to 'head' or 'full'")
  if not jax.tree.leaves(trainable_state):
    raise ConfigError(
        f'train.trainable={trainable_name!r} selects no variable of this model; accepted values '
        f'are {tuple(TRAINABLE)}')
  return graphdef, trainable_state, frozen_state, rest_state


def count_params(state: nnx.State) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state))


def cast(state: nnx.State, dtype) -> nnx.State:
  """Floating leaves of `state` cast to `dtype` (frozen weights stored in bf16)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      state)
