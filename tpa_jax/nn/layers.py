"""Basic layers with logical-axis annotations: Dense, LayerNorm, frozen BatchNorm, FeedForward."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax import sharding
from tpa_jax.errors import ConfigError

Axes = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

# Activations of the FFN and conv modules (model.activation). 'gelu' is the exact (erf) GELU of
# PyTorch checkpoints; 'gelu_tanh' its tanh approximation.
ACTIVATIONS = {
    'swish': jax.nn.silu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'relu': jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function called `name` (a key of ACTIVATIONS)."""
  if name not in ACTIVATIONS:
    raise ConfigError(f'model.activation={name!r}: accepted values are {tuple(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def _tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


class Dense(nnx.Module):
  """y = x·W + b contracting the trailing `in_shape` dims of x with the leading dims of W.

  Kernel shape is `in_shape + out_shape`, so attention projections keep (embed, heads, kv) axes.
  Inputs and weights are cast to `dtype`; the product accumulates and is returned in
  `out_dtype` (default `dtype`; task heads ask for float32 when computing in bf16).
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
               axes: Axes, use_bias: bool = True, kernel_init: Initializer | None = None,
               bias_init: Initializer = nnx.initializers.zeros_init(),
               dtype=jnp.float32, param_dtype=jnp.float32, param_type=nnx.Param,
               out_dtype=None, rngs: nnx.Rngs):
    self.in_shape, self.out_shape = _tuple(in_shape), _tuple(out_shape)
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    if len(axes) != n_in + n_out:
      raise ValueError(f'Dense axes {axes} must name {n_in + n_out} kernel dims')
    if kernel_init is None:
      kernel_init = nnx.initializers.variance_scaling(
          1.0, 'fan_in', 'truncated_normal', in_axis=tuple(range(n_in)),
          out_axis=tuple(range(n_in, n_in + n_out)))
    self.dtype, self.out_dtype = dtype, out_dtype or dtype
    shape = self.in_shape + self.out_shape
    self.kernel = param_type(kernel_init(rngs.params(), shape, param_dtype), out_sharding=axes)
    self.bias = (param_type(bias_init(rngs.params(), self.out_shape, param_dtype),
                            out_sharding=axes[n_in:]) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != self.in_shape:
      raise ValueError(f'Dense expects trailing dims {self.in_shape}, got input shape {x.shape}')
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                            (contract, ((), ())), preferred_element_type=self.out_dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.out_dtype)
    return y


def adapted(projection: Dense, x: jax.Array, adapters, target: str) -> jax.Array:
  """projection(x), plus the LoRA update of `target` when the block's `adapters` carry one
  (`adapters.update(target, x)`: see ConformerBlock; None: no adapters)."""
  y = projection(x)
  update = adapters.update(target, x) if adapters is not None else None
  if update is not None:
    y = y + update.astype(y.dtype)
  return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, dim: int, *, axis_name: str | None = 'embed', eps: float = 1e-5,
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               param_type=nnx.Param, rngs: nnx.Rngs):
    del rngs  # deterministic init
    self.eps, self.dtype = eps, dtype
    self.scale = param_type(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))
    self.bias = param_type(jnp.zeros((dim,), param_dtype), out_sharding=(axis_name,)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class FrozenBatchNorm(nnx.Module):
  """BatchNorm that always uses its stored statistics (the encoder is frozen; stats never update)."""

  def __init__(self, dim: int, *, axis_name: str | None = 'conv', eps: float = 1e-5,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(axis_name,))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), param_dtype), out_sharding=(axis_name,))
    self.var = nnx.BatchStat(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    f32 = lambda v: v[...].astype(jnp.float32)
    inv = jax.lax.rsqrt(f32(self.var) + self.eps) * f32(self.scale)
    y = (x.astype(jnp.float32) - f32(self.mean)) * inv + f32(self.bias)
    return y.astype(self.dtype)


class FeedForward(nnx.Module):
  """Conformer FFN module: LayerNorm -> Linear(dim, hidden) -> swish (or `activation`) ->
  Linear(hidden, dim)."""

  def __init__(self, dim: int, hidden: int, *, use_bias: bool = True, eps: float = 1e-5,
               activation: str = 'swish', dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    get_activation(activation)  # a clear error before any weight is made
    self.activation = activation
    self.norm = LayerNorm(dim, eps=eps, **kw)
    self.up = Dense(dim, hidden, axes=('embed', 'mlp'), use_bias=use_bias, **kw)
    self.down = Dense(hidden, dim, axes=('mlp', 'embed'), use_bias=use_bias, **kw)

  def __call__(self, x_btd: jax.Array, lora=None, name: str = '') -> jax.Array:
    """`lora`: the block's LoRA updates; this module's targets are `{name}_up`, `{name}_down`."""
    h_btd = self.norm(x_btd)
    h_btf = ACTIVATIONS[self.activation](adapted(self.up, h_btd, lora, f'{name}_up'))
    h_btf = sharding.constrain(h_btf, ('batch', 'time', 'mlp'))
    return adapted(self.down, h_btf, lora, f'{name}_down')

