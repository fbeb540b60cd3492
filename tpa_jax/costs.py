"""Cost measurements of a train step: parameters, per-device weight-state bytes, FLOPs, memory."""

from __future__ import annotations

import jax
import numpy as np

from tpa_jax.train_step import Trainer


def per_device_bytes(tree) -> int:
  """Bytes one device holds for the arrays of `tree` (the largest per-device total)."""
  totals: dict = {}
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array):
      for shard in x.addressable_shards:
        totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    else:
      totals[None] = totals.get(None, 0) + np.asarray(x).nbytes
  return max(totals.values(), default=0)


def weight_state_bytes(trainer: Trainer) -> dict[str, int]:
  """Per-device bytes of parameters (trainable + frozen), gradients and optimizer state.

  Gradients exist only for trainable weights and have their shape, dtype and sharding.
  """
  trainable = per_device_bytes(trainer.state.trainable)
  out = {'trainable': trainable, 'frozen': per_device_bytes(trainer.frozen),
         'gradients': trainable, 'optimizer': per_device_bytes(trainer.state.opt_state)}
  out['total'] = sum(out.values())
  return out


def lowered_flops(lowered) -> float:
  """FLOPs from the lowered (not compiled) module; lower an unrolled model to count every layer."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])
