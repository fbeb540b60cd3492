"""Config -> modules, in one place. Layers take the few numbers they need; this reads the config."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tpa_jax import sharding
from tpa_jax.config import selection
from tpa_jax.errors import ConfigError
from tpa_jax.nn import adapters as adapters_lib
from tpa_jax.nn import best_rq
from tpa_jax.nn.lora import BlockLoRA
from tpa_jax.nn.conformer import ConformerBlock, ConformerEncoder
from tpa_jax.nn.frontend import (FRONTENDS, Conv2dSubsampling, DepthwiseStridingSubsampling,
                                  StackedFrames)
from tpa_jax.nn.heads import ClassificationHead, CTCHead
from tpa_jax.nn.layers import LayerNorm
from tpa_jax.nn.model import SpeechModel

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
HEADS = ('ctc', 'classification', 'best_rq')


def dtype(name: str, field: str):
  if name not in DTYPES:
    raise ValueError(f'{field}={name!r}: accepted values are {tuple(DTYPES)}')
  return DTYPES[name]


def adapter_blocks(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The blocks that carry adapters (empty when adapter.placement is 'none')."""
  if config.adapter.placement == 'none':
    return ()
  adapters_lib.check_placement(config.adapter.placement)
  return selection.parse_blocks(config.adapter.blocks, config.model.num_blocks)


def build_model(config: ml_collections.ConfigDict, *, seed: int) -> SpeechModel:
  """The SpeechModel described by `config.model`, `config.adapter` and `config.head`.

  Base, adapters and head draw from separate random streams, so for one seed the base and head
  weights are the same whatever the adapter configuration.
  """
  m, a, h = config.model, config.adapter, config.head
  key = jax.random.key(seed)
  rngs = nnx.Rngs(params=key)
  adapter_rngs = nnx.Rngs(params=jax.random.fold_in(key, 1))
  head_rngs = nnx.Rngs(params=jax.random.fold_in(key, 2))
  kw = dict(dtype=dtype(m.dtype, 'model.dtype'),
            param_dtype=dtype(m.param_dtype, 'model.param_dtype'))
  f = m.frontend
  if f.kind == 'conv2d':
    frontend = Conv2dSubsampling(f.input_dim, m.dim, channels=f.channels, num_layers=f.num_layers,
                                 kernel_size=f.kernel_size, stride=f.stride, rngs=rngs, **kw)
  elif f.kind == 'stacked':
    frontend = StackedFrames(f.input_dim, m.dim, stack=f.stack, eps=m.norm_eps, rngs=rngs, **kw)
  elif f.kind == 'dw_striding':
    frontend = DepthwiseStridingSubsampling(
        f.input_dim, m.dim, channels=f.channels, num_layers=f.num_layers,
        kernel_size=f.kernel_size, stride=f.stride, rngs=rngs, **kw)
  else:
    raise ConfigError(f'model.frontend.kind={f.kind!r}: accepted values are {FRONTENDS}')

  make_block = functools.partial(
      ConformerBlock, m.dim, m.num_heads, m.ffn_dim, m.conv_kernel_size, position=m.position,
      left_max_position=m.left_max_position, right_max_position=m.right_max_position,
      # Configs saved before these fields existed run the reference attention.
      attention_impl=m.get('attention_impl', 'xla'), attention_block=m.get('attention_block', 128),
      conv_causal=m.conv_causal, conv_norm=m.conv_norm, ffn_bias=m.ffn_bias,
      attention_bias=m.attention_bias, conv_bias=m.conv_bias, activation=m.activation,
      eps=m.norm_eps, **kw)
  blocks = adapter_blocks(config)
  make_adapters = None
  if blocks and a.placement == 'lora':
    make_adapters = functools.partial(
        BlockLoRA, m.dim, m.num_heads, m.ffn_dim, rank=a.bottleneck, alpha=a.lora_alpha,
        targets=selection.parse_targets(a.lora_targets), dtype=kw['dtype'])
  elif blocks:
    # Adapter weights are created in float32 whatever the base's parameter dtype.
    make_adapters = functools.partial(
        adapters_lib.BlockAdapters, a.placement, m.dim, a.bottleneck,
        residual_weight=a.residual_weight, use_norm=a.use_norm, activation=a.activation,
        up_init=a.up_init, eps=m.norm_eps, dtype=kw['dtype'], param_dtype=jnp.float32)
  encoder = ConformerEncoder(
      frontend, lambda r: make_block(rngs=r), m.num_blocks,
      final_norm=LayerNorm(m.dim, eps=m.norm_eps, rngs=rngs, **kw) if m.final_norm else None,
      make_adapters=(lambda r: make_adapters(rngs=r)) if make_adapters else None,
      adapter_blocks=blocks, scan_layers=m.scan_layers, remat_policy=m.remat_policy, rngs=rngs,
      adapter_rngs=adapter_rngs)

  head_kw = dict(dtype=kw['dtype'], param_dtype=jnp.float32, rngs=head_rngs)
  if h.kind == 'ctc':
    head = CTCHead(m.dim, h.vocab_size, **head_kw)
  elif h.kind == 'classification':
    head = ClassificationHead(m.dim, h.num_classes, **head_kw)
  elif h.kind == 'best_rq':
    if 'ssl' not in config:
      raise ConfigError("head.kind='best_rq' needs the config's ssl section "
                        '(tpa_jax.config.ssl.ssl_fields(), as configs/pretrain.py has)')
    # The quantizer draws from its own stream: fixed by the seed whatever the heads are.
    head = best_rq.BestRQHead(m.dim, f.input_dim, best_rq.Settings.from_config(config),
                              dtype=kw['dtype'], rngs=head_rngs,
                              quantizer_rngs=nnx.Rngs(params=jax.random.fold_in(key, 3)))
  else:
    raise ConfigError(f'head.kind={h.kind!r}: accepted values are {HEADS}')
  return SpeechModel(encoder, head)


def create_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 seed: int | None = None) -> SpeechModel:
  """Builds the model with each weight created directly in its shard on `mesh`."""
  seed = config.seed if seed is None else seed
  adapter_blocks(config)  # validate the adapter config before tracing anything
  return sharding.create_sharded(lambda: build_model(config, seed=seed), mesh)
