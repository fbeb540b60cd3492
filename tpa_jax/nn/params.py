"""Variable types that decide what trains: adapters and task heads are their own kinds of Param."""

from flax import nnx


class AdapterParam(nnx.Param):
  """A weight of a residual adapter; trained while the encoder stays frozen."""


class LoRAParam(AdapterParam):
  """A LoRA factor (A or B of a low-rank update); an adapter weight, so the adapter filter
  trains it and base states leave it out."""


class HeadParam(nnx.Param):
  """A weight of a task head (CTC projection, classifier); trained with the adapters."""
