"""Variable types that decide what trains: adapters and task heads are their own kinds of Param."""

from flax import nnx


class AdapterParam(nnx.Param):
  """A weight of a residual adapter; trained while the encoder stays frozen."""


class HeadParam(nnx.Param):
  """A weight of a task head (CTC projection, classifier); trained with the adapters."""
