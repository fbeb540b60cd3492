"""Named presets: model shapes, adaptation methods, datasets, and `adapt_config` that combines them.

`configs/adapt.py:model=tiny,method=tpa,blocks=2:4` is `adapt_config('model=tiny,...')`.
"""

from __future__ import annotations

import json
import os

import ml_collections

from tpa_jax.config import selection
from tpa_jax.config.fields import base_config
from tpa_jax.config.files import parse_arg

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Domains of the synthetic speech corpus: the full ones, and tiny ones for tests.
DOMAINS_FILE = os.path.join(_PACKAGE, 'data', 'speech_domains.json')
TINY_DOMAINS_FILE = os.path.join(_PACKAGE, 'data', 'speech_domains_tiny.json')

# Settings of the giant presets, which target TPUs: bf16 compute and every block rematerialised
# (only block inputs are kept for the backward pass), so activations of a per-device micro-batch
# of 8 x 30 s fit beside the weights.
_GIANT = dict(dtype='bfloat16', remat_policy='full')

# Model shapes by name. `tiny` is for tests, `demo` for `make demo`, `bench` for the step-cost
# benchmark (8 blocks x 256). The giant ones take the shapes of published encoders; the counts
# are of tpa_jax's conformer (4x FFNs, GLU conv module, biases, 64-token CTC head), from
# abstract shapes (`tpa_jax.costs.abstract_param_count`; tests keep each within 10% of its name).
MODEL_PRESETS = {
    'tiny': dict(dim=32, num_blocks=4, num_heads=2, ffn_dim=64, conv_kernel_size=5,
                 left_max_position=8, right_max_position=2, frontend=dict(channels=8)),
    'demo': dict(dim=144, num_blocks=8, num_heads=4, ffn_dim=576, conv_kernel_size=15,
                 frontend=dict(channels=64)),
    'bench': dict(dim=256, num_blocks=8, num_heads=4, ffn_dim=1024, conv_kernel_size=15,
                  frontend=dict(channels=64)),
    # w2v-BERT 2.0 (Seamless, 2023: facebook/w2v-bert-2.0's config) and BEST-RQ 0.6B share 24
    # blocks x 1024; w2v-BERT 2.0's details: 16 heads, FFN 4096, depthwise kernel 31, Shaw
    # relative keys in [-64, 8], 2 x 80 stacked filterbank frames (20 ms). 0.581 B parameters.
    '600m': dict(dim=1024, num_blocks=24, num_heads=16, ffn_dim=4096, conv_kernel_size=31,
                 left_max_position=64, right_max_position=8,
                 frontend=dict(kind='stacked', stack=2), **_GIANT),
    # USM (Google USM, Zhang et al. 2023, arXiv 2303.01037: a 2B-parameter conformer of 32
    # blocks x 1536), with lingvo's conformer details: 16 heads, FFN 4 x 1536, depthwise kernel 5,
    # Transformer-XL relative positions, conv2d x4 subsampling (40 ms). 1.818 B parameters.
    '2b': dict(dim=1536, num_blocks=32, num_heads=16, ffn_dim=6144, conv_kernel_size=5,
               position='rel_pos', frontend=dict(kind='conv2d', channels=128), **_GIANT),
    # BigSSL's Conformer G (Zhang et al. 2021, arXiv 2109.13226: 8B parameters, 36 blocks x
    # 3072, 16 heads, depthwise kernel 5), FFN 4 x 3072, Transformer-XL relative positions,
    # conv2d x4 subsampling. 8.166 B parameters.
    '8b': dict(dim=3072, num_blocks=36, num_heads=16, ffn_dim=12288, conv_kernel_size=5,
               position='rel_pos', frontend=dict(kind='conv2d', channels=128), **_GIANT),
}

# Adaptation methods: which placement carries adapters and which variables train.
METHODS = {
    'full': dict(placement='none', trainable='full'),
    'head': dict(placement='none', trainable='head'),
    'tpa': dict(placement='ff_parallel', trainable='adapters'),
    'ff_parallel': dict(placement='ff_parallel', trainable='adapters'),
    'ff_sequential': dict(placement='ff_sequential', trainable='adapters'),
    'block_parallel': dict(placement='block_parallel', trainable='adapters'),
    'block_sequential': dict(placement='block_sequential', trainable='adapters'),
    'mhsa_parallel': dict(placement='mhsa_parallel', trainable='adapters'),
    'conv_parallel': dict(placement='conv_parallel', trainable='adapters'),
    'lora': dict(placement='lora', trainable='adapters'),
}


# Keys of the `configs/adapt.py` argument string.
ADAPT_KEYS = ('model', 'method', 'blocks', 'bottleneck', 'data')


# `data=` values besides 'synthetic_speech/<domain>'.
DATA_NAMES = ('random', 'librispeech')


def adapt_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Base config with a model preset, a method, adapter overrides and a dataset from `arg`.

  Keys: model (a preset), method, blocks (adapted blocks), bottleneck, data ('random',
  'librispeech', 'synthetic_speech/<domain>' or 'manifest:DIR').
  """
  args = parse_arg(arg)
  unknown = sorted(set(args) - set(ADAPT_KEYS))
  if unknown:
    raise ValueError(f'unknown config argument(s) {unknown} in {arg!r}; accepted: {ADAPT_KEYS}')
  c = base_config()
  model = args.get('model', 'tiny')
  if model not in MODEL_PRESETS:
    raise ValueError(f'model={model!r}: accepted presets are {tuple(MODEL_PRESETS)}')
  c.model.update_from_flattened_dict(flatten(MODEL_PRESETS[model]))
  method = args.get('method', 'tpa')
  apply_method(c, method)
  if ('blocks' in args or 'bottleneck' in args) and c.adapter.placement == 'none':
    with_adapters = tuple(m for m, v in METHODS.items() if v['placement'] != 'none')
    raise ValueError(f'blocks= and bottleneck= select adapters, and method={method!r} has none; '
                     f'accepted with: {with_adapters}')
  if 'blocks' in args:
    selection.parse_blocks(args['blocks'], c.model.num_blocks)  # a named error if out of range
    c.adapter.blocks = args['blocks']
  if 'bottleneck' in args:
    c.adapter.bottleneck = _positive_int('bottleneck', args['bottleneck'])
  if 'data' in args:
    apply_data(c, args['data'])
  return c


def apply_data(c: ml_collections.ConfigDict, name: str) -> None:
  """Points `c.data` at a dataset: 'random', 'librispeech' (train-clean-100 / test-clean) or
  'synthetic_speech/<domain>' with a domain of the embedded corpus, or 'manifest:DIR'."""
  if name.startswith('manifest:'):  # checked when the data is opened (tpa_jax/data/manifest.py)
    c.data.name = name
    return
  family, _, domain = name.partition('/')
  if family == 'synthetic_speech':
    domains = synthetic_domains()
    if domain not in domains:
      raise ValueError(f'data={name!r}: accepted synthetic_speech domains are {domains} (a '
                       'domain of your own: --config.data.name and --config.data.domains_file)')
    c.data.name = name
    if domain.endswith('_tiny'):
      c.data.domains_file = TINY_DOMAINS_FILE
    return
  if name not in DATA_NAMES:
    raise ValueError(f"data={name!r}: accepted values are {DATA_NAMES}, 'manifest:DIR' or "
                     f"'synthetic_speech/<domain>' with a domain in {synthetic_domains()}")
  c.data.name = name
  if name == 'librispeech':
    c.data.train_split = 'train_clean100'
    c.data.eval_split = 'test_clean'
    # LibriSpeech utterances last up to ~35 s.
    c.data.bucket_seconds = (8.0, 16.0, 24.0, 36.0)


def synthetic_domains() -> tuple[str, ...]:
  """Domain names of the embedded synthetic corpus (full and tiny)."""
  names = []
  for path in (DOMAINS_FILE, TINY_DOMAINS_FILE):
    with open(path) as f:
      names.extend(json.load(f))
  return tuple(names)


def _positive_int(key: str, value: str) -> int:
  try:
    number = int(value)
  except ValueError:
    number = 0
  if number < 1:
    raise ValueError(f'{key}={value!r}: accepted values are positive integers')
  return number


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
  """Sets the adapter placement and the trainable filter of `method` (a key of METHODS)."""
  if method not in METHODS:
    raise ValueError(f'method={method!r}: accepted methods are {tuple(METHODS)}')
  c.adapter.placement = METHODS[method]['placement']
  c.train.trainable = METHODS[method]['trainable']


def flatten(d: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
