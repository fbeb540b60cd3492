"""Adapt a conformer: a model preset, an adaptation method, its blocks and bottleneck, a dataset.

  --config=configs/adapt.py:model=demo,method=tpa,blocks=4:8,bottleneck=32
  --config=configs/adapt.py:model=2b,method=tpa,blocks=16:32,data=librispeech

model: tiny | demo | bench | 600m | 2b | 8b (shapes and sources in tpa_jax/config.py);
method: full | head | tpa | ff_sequential | block_parallel | block_sequential | mhsa_parallel |
conv_parallel; blocks: 'all', a slice such as 16:32, or indices such as 0,3,5 (adapter methods
only); bottleneck: the adapter dimension r; data: random | librispeech |
synthetic_speech/<domain> | manifest:DIR (your recordings: tpa_jax/data/manifest.py). Every field is listed, with its meaning, in
tpa_jax/config/fields.py.
"""

from tpa_jax import config as config_lib

# Arguments that build every preset with every method (tests build them all).
VARIANTS = tuple(f'model={model},method={method}' for model in config_lib.MODEL_PRESETS
                 for method in config_lib.METHODS)


def get_config(arg=None):
  return config_lib.adapt_config(arg)
