"""Base fingerprints: a base's model config plus a digest of its weights, computed where the
weights live (each array reduced on its own devices; two 32-bit sums per array reach the host)."""

from __future__ import annotations

import hashlib
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax.checkpoint.trees import named_leaves
from tpa_jax.nn.params import AdapterParam


def base_state(model: nnx.Module) -> nnx.State:
  """What a base checkpoint holds: every encoder variable except adapters (the layout does not
  depend on which blocks carry adapters)."""
  return nnx.state(model.encoder, nnx.Not(AdapterParam))


# Compiler options of loops that must read a stack one slice at a time.
NO_HOISTING = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}
# The digest runs once per base: integer sums need none of the backend's optimisation passes,
# which at the tiny size take half of a trainer's build (3.3 s -> 1.7 s on 2 cores).
_DIGEST_OPTIONS = {**NO_HOISTING, 'xla_backend_optimization_level': 0}
# Compiled digests by the arrays' names, shapes, dtypes and shardings: a process that builds
# several trainers over one base (a study worker, a benchmark) compiles it once.
_DIGESTS: dict = {}
_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


def _bits(x: jax.Array) -> jax.Array:
  if x.dtype.itemsize == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if x.dtype.itemsize == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  raise ValueError(f'cannot fingerprint arrays of dtype {x.dtype} (1-, 2- or 4-byte types)')


def _mixed_sums(x: jax.Array, offset: jax.Array) -> jax.Array:
  """The two sums over `x`, whose first element sits at flat position `offset`."""
  bits = _bits(x)
  position = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
  for axis in range(1, x.ndim):
    position = position * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(
        jnp.uint32, x.shape, axis)
  position = position + offset
  out = []
  for a, b in (_MIX[:2], _MIX[2:]):
    h = (bits ^ (position * jnp.uint32(a))) * jnp.uint32(b)
    h = h ^ (h >> 15)
    out.append(jnp.sum(h, dtype=jnp.uint32))
  return jnp.stack(out)


def _checksums(x: jax.Array) -> jax.Array:
  """Two order-sensitive 32-bit sums of the bits of `x` (wrapping), reduced where `x` lives.
  A stacked array is reduced one leading slice at a time: its 32-bit temporaries never exceed
  one slice (a whole-array pass would hold several times a bf16 base)."""
  if x.ndim < 2 or x.shape[0] == 1:
    return _mixed_sums(x, jnp.uint32(0))
  row = jnp.uint32(math.prod(x.shape[1:]) % 2 ** 32)
  sums = jax.lax.map(lambda args: _mixed_sums(args[1], args[0] * row),
                     (jnp.arange(x.shape[0], dtype=jnp.uint32), x))
  return jnp.sum(sums, axis=0, dtype=jnp.uint32)


def weights_digest(state) -> str:
  """A digest of every array of `state` (names, shapes, dtypes and bits). Each array is reduced
  on the devices that hold it; only two 32-bit numbers per array come to the host."""
  named = named_leaves(state)
  arrays = [leaf for _, leaf in named]
  key = tuple((names, x.shape, x.dtype, x.sharding) for names, x in named)
  if key not in _DIGESTS:
    shardings = [jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
                 if isinstance(x.sharding, jax.sharding.NamedSharding) else None for x in arrays]
    digest = jax.jit(lambda xs: [_checksums(x) for x in xs],
                     out_shardings=shardings if None not in shardings else None)
    # Loop-invariant code motion would hoist each slice's 32-bit conversion out of the loop, a
    # whole-array copy at 2-4x the bytes of a bf16 weight: the loop reads one slice at a time.
    if len(_DIGESTS) >= 8:
      _DIGESTS.pop(next(iter(_DIGESTS)))
    _DIGESTS[key] = digest.lower(arrays).compile(compiler_options=_DIGEST_OPTIONS)
  sums = jax.device_get(_DIGESTS[key](arrays))
  h = hashlib.sha256()
  for (names, x), s in zip(named, sums):
    h.update(f"{'/'.join(names)}|{tuple(x.shape)}|{x.dtype}|{int(s[0])}|{int(s[1])}\n".encode())
  return h.hexdigest()[:16]


# Model fields that do not change the weights (compute dtype, layout of the computation).
_NOT_WEIGHTS = ('dtype', 'scan_layers', 'remat_policy', 'attention_impl', 'attention_block')


def base_fingerprint(model_config, model: nnx.Module) -> dict:
  """Identity of a base: its model config plus a digest of its weights (`id` combines both)."""
  config = {k: v for k, v in model_config.to_dict().items() if k not in _NOT_WEIGHTS}
  digest = weights_digest(base_state(model))
  blob = json.dumps({'config': config, 'weights': digest}, sort_keys=True, default=str)
  return {'id': hashlib.sha256(blob.encode()).hexdigest()[:16], 'weights': digest,
          'config': json.loads(json.dumps(config, default=str))}
