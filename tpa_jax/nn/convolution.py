"""The conformer convolution module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax import sharding
from tpa_jax.errors import ConfigError
from tpa_jax.nn.layers import ACTIVATIONS, Dense, FrozenBatchNorm, LayerNorm, get_activation

CONV_NORMS = ('layer', 'batch')


class ConvModule(nnx.Module):
  """LayerNorm -> pointwise (2·dim) -> GLU -> depthwise (causal or symmetric) -> LayerNorm or
  BatchNorm (frozen statistics) -> swish (or `activation`) -> pointwise.

  Padded frames are zeroed before the depthwise convolution, so valid frames never see padding.
  """

  def __init__(self, dim: int, kernel_size: int, *, causal: bool = False, norm: str = 'layer',
               use_bias: bool = True, eps: float = 1e-5, activation: str = 'swish',
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if norm not in CONV_NORMS:
      raise ConfigError(f'model.conv_norm={norm!r}: accepted values are {CONV_NORMS}')
    if kernel_size < 1:
      raise ConfigError(f'model.conv_kernel_size={kernel_size}: must be a positive integer')
    if not causal and kernel_size % 2 == 0:
      raise ConfigError(f'model.conv_kernel_size={kernel_size}: a symmetric (non-causal) '
                       'depthwise convolution needs an odd kernel size')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.kernel_size, self.causal, self.dtype = kernel_size, causal, dtype
    get_activation(activation)  # a clear error before any weight is made
    self.activation = activation
    self.norm_in = LayerNorm(dim, eps=eps, **kw)
    # (embed, 2, conv): the GLU halves sit on an unsharded axis, channels on `conv`.
    self.pointwise_in = Dense(dim, (2, dim), axes=('embed', None, 'conv'), use_bias=use_bias, **kw)
    self.depthwise_kernel = nnx.Param(
        nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=0,
                                          out_axis=1)(rngs.params(), (kernel_size, dim),
                                                      param_dtype),
        out_sharding=(None, 'conv'))
    self.depthwise_bias = (nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=('conv',))
                           if use_bias else None)
    if norm == 'layer':
      self.norm_mid = LayerNorm(dim, axis_name='conv', eps=eps, **kw)
    else:
      self.norm_mid = FrozenBatchNorm(dim, eps=eps, **kw)
    self.pointwise_out = Dense(dim, dim, axes=('conv', 'embed'), use_bias=use_bias, **kw)

  def _depthwise(self, x_btc: jax.Array) -> jax.Array:
    """y[t] = sum_k w[k]·x[t + k - left]: a sum of shifted products, which XLA fuses into one
    elementwise kernel (forward and backward) instead of a grouped convolution, whose filter
    gradient is slow on CPU and GPU."""
    k, t = self.kernel_size, x_btc.shape[1]
    left = k - 1 if self.causal else (k - 1) // 2
    kernel_kc = self.depthwise_kernel[...].astype(self.dtype)
    x_pad = jnp.pad(x_btc, ((0, 0), (left, k - 1 - left), (0, 0)))
    y = x_pad[:, 0:t] * kernel_kc[0]
    for i in range(1, k):
      y = y + x_pad[:, i:i + t] * kernel_kc[i]
    if self.depthwise_bias is not None:
      y = y + self.depthwise_bias[...].astype(self.dtype)
    return y

  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    h_btgc = self.pointwise_in(self.norm_in(x_btd))
    h_btc = h_btgc[..., 0, :] * jax.nn.sigmoid(h_btgc[..., 1, :])
    h_btc = sharding.constrain(h_btc, ('batch', 'time', 'conv'))
    h_btc = jnp.where(mask_bt[..., None], h_btc, jnp.zeros((), h_btc.dtype))
    h_btc = ACTIVATIONS[self.activation](self.norm_mid(self._depthwise(h_btc)))
    return self.pointwise_out(h_btc)
