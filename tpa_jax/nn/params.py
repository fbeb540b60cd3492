"""Variable types that decide what trains: adapters and task heads are their own kinds of Param,
fixed random arrays are no Param at all, and the filters (`train.trainable`) that select them."""

from flax import nnx

from tpa_jax.errors import ConfigError


class AdapterParam(nnx.Param):
  """A weight of a residual adapter; trained while the encoder stays frozen."""


class LoRAParam(AdapterParam):
  """A LoRA factor (A or B of a low-rank update); an adapter weight, so the adapter filter
  trains it and base states leave it out."""


class HeadParam(nnx.Param):
  """A weight of a task head (CTC projection, classifier); trained with the adapters."""


class FixedArray(nnx.Variable):
  """Fixed random state of a run (BEST-RQ's projection and codebooks): not a Param, so no
  trainable filter matches it; saved with the run, never trained."""


# train.trainable -> the variable types that get gradients and optimizer state.
TRAINABLE = {
    'adapters': nnx.Any(AdapterParam, HeadParam),  # TPA and the other adapter methods
    'head': HeadParam,  # linear probing
    'full': nnx.Param,  # full fine-tuning: every weight (nnx.Param also matches its subclasses)
}


def trainable_filter(name: str):
  if name not in TRAINABLE:
    raise ConfigError(f'train.trainable={name!r}: accepted values are {tuple(TRAINABLE)}')
  return TRAINABLE[name]
