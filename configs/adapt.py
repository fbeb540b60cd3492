"""Adapt a conformer: a model preset and an adaptation method.

  --config=configs/adapt.py:model=demo,method=tpa,blocks=4:8,bottleneck=32

model: tiny | demo | bench; method: full | head | tpa | ff_sequential | block_parallel |
block_sequential | mhsa_parallel | conv_parallel. Every field is listed, with its meaning, in
tpa_jax/config.py:base_config.
"""

from tpa_jax import config as config_lib


def get_config(arg=None):
  return config_lib.adapt_config(arg)
