"""Cost measurements of a train step: parameters, per-device weight-state bytes, FLOPs, memory."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from flax import nnx

from tpa_jax import config as config_lib
from tpa_jax import sharding
from tpa_jax.nn import build
from tpa_jax.train.trainer import Trainer


def abstract_param_count(config: ml_collections.ConfigDict) -> int:
  """Parameters of the model `config` describes, counted from abstract shapes (nothing is
  allocated, so it serves the giant presets on any machine)."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, abstract = sharding.abstract_model(
      lambda: build.build_model(config, seed=config.seed), mesh)
  params = nnx.state(nnx.merge(graphdef, abstract), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def per_device_bytes(tree) -> int:
  """Bytes one device holds for the arrays of `tree` (the largest per-device total); abstract
  leaves (ShapeDtypeStruct with a sharding) count their shard shape."""
  totals: dict = {}
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
      nbytes = math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
      for device in x.sharding.device_set:
        totals[device] = totals.get(device, 0) + nbytes
    elif isinstance(x, jax.Array):
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


def jaxpr_flops(fn, *args) -> float:
  """FLOPs of the matrix products and convolutions of `fn(*args)`, counted on its jaxpr with each
  scan body counted once per iteration (a lowered program's cost analysis counts a loop body
  once), so a layer-scanned step is counted whole."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _sub_jaxprs(params: dict):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs.shape[d] for d in contract)
    elif name == 'conv_general_dilated':
      rhs, spec = eqn.invars[1].aval, eqn.params['dimension_numbers'].rhs_spec
      # Each output element: a dot over the kernel's input features and spatial taps.
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          rhs.shape[d] for d in spec[1:])
    inner = [_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)]
    if name == 'cond':
      total += max(inner, default=0.0)  # one branch runs
    else:
      total += sum(inner) * eqn.params.get('length', 1)  # scan: its body `length` times
  return total


def method_config(preset: str, method: str) -> ml_collections.ConfigDict:
  """The config of `preset` adapted by `method` (a key of config.METHODS, or 'tpa_upper_half':
  TPA on the upper half of the blocks), as the cost benchmarks compare them."""
  if method == 'tpa_upper_half':
    num_blocks = config_lib.MODEL_PRESETS[preset]['num_blocks']
    return config_lib.adapt_config(f'model={preset},method=tpa,blocks={num_blocks // 2}:')
  return config_lib.adapt_config(f'model={preset},method={method}')
