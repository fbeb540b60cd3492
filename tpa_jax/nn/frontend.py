"""Frontends: features [B, T, F] + mask -> frames [B, T', D] + mask at the encoder rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpa_jax.errors import ConfigError
from tpa_jax.nn.layers import Dense, LayerNorm

FRONTENDS = ('conv2d', 'stacked', 'dw_striding')


def lengths(mask_bt: jax.Array) -> jax.Array:
  """Valid lengths of prefix masks (valid frames first, then padding)."""
  return mask_bt.astype(jnp.int32).sum(-1)


def prefix_mask(lengths_b: jax.Array, t: int) -> jax.Array:
  return jnp.arange(t)[None, :] < lengths_b[:, None]


class Conv2dSubsampling(nnx.Module):
  """Stacked 2-D convolutions (kernel k, stride s, VALID, ReLU) over time x frequency, then a linear
  projection of channels x remaining frequencies to `dim`. Two stride-2 layers subsample x4.

  An output frame is valid only if its whole receptive field lies on valid input frames, so the
  valid outputs never depend on padding.
  """

  def __init__(self, input_dim: int, dim: int, *, channels: int, num_layers: int = 2,
               kernel_size: int = 3, stride: int = 2, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.input_dim, self.dtype = input_dim, dtype
    self.kernel_size, self.stride = kernel_size, stride
    init = nnx.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal',
                                             in_axis=(0, 1, 2), out_axis=3)
    kernels, biases = [], []
    freq, in_ch = input_dim, 1
    for _ in range(num_layers):
      kernels.append(nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_ch, channels),
                                    param_dtype), out_sharding=(None, None, None, None)))
      biases.append(nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=(None,)))
      freq = (freq - kernel_size) // stride + 1
      in_ch = channels
    if freq < 1:
      raise ConfigError(f'model.frontend.input_dim={input_dim} is too small for {num_layers} '
                       f'convolutions of kernel {kernel_size}, stride {stride}')
    self.kernels, self.biases = nnx.List(kernels), nnx.List(biases)
    self.out = Dense(channels * freq, dim, axes=(None, 'embed'), dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_btf: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x_btf.astype(self.dtype)[..., None]
    n = lengths(mask_bt)
    for kernel, bias in zip(self.kernels, self.biases):
      h = jax.lax.conv_general_dilated(
          h, kernel[...].astype(self.dtype), window_strides=(self.stride, self.stride),
          padding='VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      h = jax.nn.relu(h + bias[...].astype(self.dtype))
      n = jnp.maximum((n - self.kernel_size) // self.stride + 1, 0)
    b, t, f, c = h.shape
    # Channels-major flattening (c, f), as in torch-style Conv2dSubsampling checkpoints.
    h = h.transpose(0, 1, 3, 2).reshape(b, t, c * f)
    return self.out(h), prefix_mask(n, t)


class DepthwiseStridingSubsampling(nnx.Module):
  """FastConformer's subsampling (NeMo's `dw_striding`): a 2-D convolution 1 -> `channels` then
  `num_layers - 1` x (depthwise 2-D convolution -> pointwise convolution), each strided
  convolution of kernel k, stride s and zero padding (k-1)//2 in time and frequency, ReLU after
  each stage; channels x remaining frequencies are projected to `dim`. Three stride-2 stages
  subsample x8.

  Frames past an utterance's length are zeroed before each convolution, so its valid outputs are
  those of the utterance alone (zero-padded), whatever the padding holds.
  """

  def __init__(self, input_dim: int, dim: int, *, channels: int, num_layers: int = 3,
               kernel_size: int = 3, stride: int = 2, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if num_layers < 1:
      raise ConfigError(f'model.frontend.num_layers={num_layers}: must be a positive integer')
    self.input_dim, self.dtype = input_dim, dtype
    self.kernel_size, self.stride, self.pad = kernel_size, stride, (kernel_size - 1) // 2
    init = nnx.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal',
                                             in_axis=(0, 1, 2), out_axis=3)
    param = lambda shape: nnx.Param(init(rngs.params(), shape, param_dtype),
                                    out_sharding=(None,) * len(shape))
    bias = lambda: nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=(None,))
    k = kernel_size
    # HWIO kernels; a depthwise kernel holds one input channel per group.
    self.conv_kernel, self.conv_bias = param((k, k, 1, channels)), bias()
    self.depthwise_kernels = nnx.List([param((k, k, 1, channels)) for _ in range(num_layers - 1)])
    self.depthwise_biases = nnx.List([bias() for _ in range(num_layers - 1)])
    self.pointwise_kernels = nnx.List([param((1, 1, channels, channels))
                                       for _ in range(num_layers - 1)])
    self.pointwise_biases = nnx.List([bias() for _ in range(num_layers - 1)])
    freq = input_dim
    for _ in range(num_layers):
      freq = self._out_len(freq)
    if freq < 1:
      raise ConfigError(f'model.frontend.input_dim={input_dim} is too small for {num_layers} '
                       f'convolutions of kernel {kernel_size}, stride {stride}')
    self.out = Dense(channels * freq, dim, axes=(None, 'embed'), dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)

  def _out_len(self, n):
    return (n + 2 * self.pad - self.kernel_size) // self.stride + 1

  def _conv(self, h, kernel, bias, stride, pad, groups=1):
    h = jax.lax.conv_general_dilated(
        h, kernel[...].astype(self.dtype), window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups)
    return h + bias[...].astype(self.dtype)

  def __call__(self, x_btf: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = jnp.maximum(lengths(mask_bt), 0)
    h = jnp.where(mask_bt[..., None], x_btf.astype(self.dtype), 0)[..., None]
    zero_padding = lambda h, n: jnp.where(prefix_mask(n, h.shape[1])[:, :, None, None], h, 0)
    h = self._conv(h, self.conv_kernel, self.conv_bias, self.stride, self.pad)
    n = jnp.maximum(self._out_len(n), 0)
    h = jax.nn.relu(zero_padding(h, n))
    for dw_k, dw_b, pw_k, pw_b in zip(self.depthwise_kernels, self.depthwise_biases,
                                      self.pointwise_kernels, self.pointwise_biases):
      h = self._conv(h, dw_k, dw_b, self.stride, self.pad, groups=h.shape[-1])
      n = jnp.maximum(self._out_len(n), 0)
      h = self._conv(zero_padding(h, n), pw_k, pw_b, 1, 0)
      h = jax.nn.relu(zero_padding(h, n))
    b, t, f, c = h.shape
    # Channels-major flattening (c, f), as torch checkpoints flatten [B, C, T, F] -> [B, T, C·F].
    h = h.transpose(0, 1, 3, 2).reshape(b, t, c * f)
    return self.out(h), prefix_mask(n, t)


def stack_frames(x_btf: jax.Array, mask_bt: jax.Array,
                 stack: int) -> tuple[jax.Array, jax.Array]:
  """[B, T, F] -> [B, T // stack, stack·F] (a trailing partial group is dropped); a stacked frame
  is valid if its last source frame is (SeamlessM4TFeatureExtractor's stride-2 attention mask)."""
  b, t, f = x_btf.shape
  t_out = t // stack
  x = x_btf[:, :t_out * stack].reshape(b, t_out, stack * f)
  return x, mask_bt[:, stack - 1::stack][:, :t_out]


class StackedFrames(nnx.Module):
  """Stacks `stack` consecutive feature frames (2 x 80 -> 160), then LayerNorm -> Linear to `dim`,
  as w2v-BERT 2.0's feature projection. A stacked frame is valid if its last source frame is.
  """

  def __init__(self, input_dim: int, dim: int, *, stack: int = 2, eps: float = 1e-5,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.input_dim, self.stack = input_dim, stack
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(stack * input_dim, axis_name=None, eps=eps, **kw)
    self.proj = Dense(stack * input_dim, dim, axes=(None, 'embed'), **kw)

  def __call__(self, x_btf: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, mask = stack_frames(x_btf, mask_bt, self.stack)
    return self.proj(self.norm(x)), mask
