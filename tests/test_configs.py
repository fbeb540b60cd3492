"""Config files: every variant builds, the tiny ones instantiate and run, presets land at their
named sizes, and bad arguments are named."""

import glob
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpa_jax import config as config_lib
from tpa_jax.nn import build
from tpa_jax.plan import costs

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, 'configs')
# Models below this many parameters are instantiated and run by the tests.
TINY_PARAMS = 1_000_000


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Variants of config files that do not list theirs in a VARIANTS tuple.
KNOWN_VARIANTS = {'demo.py': ('tiny',)}


def variants(path, module):
  """The default (no argument), the file's VARIANTS when it lists them, and KNOWN_VARIANTS."""
  listed = (*getattr(module, 'VARIANTS', ()), *KNOWN_VARIANTS.get(os.path.basename(path), ()))
  return list(dict.fromkeys([None, *listed]))


def all_configs():
  out = []
  for path in sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py'))):
    module = load(path)
    for arg in variants(path, module):
      out.append((f'{os.path.basename(path)}:{arg or ""}', module.get_config(arg)))
  return out


CONFIGS = all_configs()


def model_key(config):
  """The fields that decide a model's size (adapters and head change it by a little)."""
  return json.dumps(config.model.to_dict(), sort_keys=True, default=str)


def test_every_config_file_and_variant_builds():
  names = [name for name, _ in CONFIGS]
  # adapt.py over every preset x method, tiny.py, demo.py and its tiny variant at least.
  for preset in ('tiny', 'demo', '600m', '2b', '8b'):
    for method in ('full', 'tpa', 'ff_sequential', 'block_sequential', 'block_parallel',
                   'mhsa_parallel', 'conv_parallel'):
      assert f'adapt.py:model={preset},method={method}' in names
  assert {'tiny.py:', 'demo.py:', 'demo.py:tiny'} <= set(names)
  for name, config in CONFIGS:
    # Every model field a config sets is one base_config declares (a typo would slip through).
    base = config_lib.base_config()
    assert set(config.model.keys()) == set(base.model.keys()), name
    build.adapter_blocks(config)  # the adapter selection resolves for this model


@pytest.fixture(scope='module')
def param_counts():
  counts = {}
  for _, config in CONFIGS:
    key = model_key(config)
    if key not in counts:
      counts[key] = costs.abstract_param_count(config)
  return counts


@pytest.mark.parametrize('preset,size', [('600m', 0.6e9), ('2b', 2e9), ('8b', 8e9)])
def test_giant_presets_land_within_ten_percent_of_their_names(preset, size):
  config = config_lib.adapt_config(f'model={preset},method=full')
  count = costs.abstract_param_count(config)
  assert abs(count - size) <= 0.1 * size, f'{preset}: {count / 1e9:.3f} B parameters'


def test_tiny_configs_instantiate_and_run_a_forward_pass(mesh1, param_counts):
  tiny = [(name, c) for name, c in CONFIGS if param_counts[model_key(c)] < TINY_PARAMS]
  assert len(tiny) >= 10, [name for name, _ in tiny]
  seen = set()
  for name, config in tiny:
    key = (model_key(config), config.adapter.placement, str(config.adapter.blocks),
           config.head.kind)
    if key in seen:
      continue
    seen.add(key)
    model = build.create_model(config, mesh1)
    graphdef, state = nnx.split(model)
    frames = 64
    x = jnp.asarray(np.random.default_rng(0).normal(
        size=(2, frames, config.model.frontend.input_dim)), jnp.float32)
    mask = jnp.ones((2, frames), bool)
    logits, out_mask = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))(state, x, mask)
    assert logits.shape[0] == 2 and logits.shape[1] == out_mask.shape[1] > 0, name
    assert bool(jnp.isfinite(logits).all()), name


@pytest.mark.parametrize('arg,message', [
    ('model=3b',
     r"model='3b': accepted presets are \('tiny', 'demo', 'bench', '600m', '2b', '8b'\)"),
    ('method=prefix', r"method='prefix': accepted methods are \('full', 'head', 'tpa'"),
    ('size=2b', r"unknown config argument\(s\) \['size'\].*accepted: \('model', 'method'"),
    ('model=2b,blocks=30:40', r"adapter.blocks='30:40' lies outside a model of 32 blocks"),
    ('method=full,blocks=4:8', r"method='full' has none; accepted with: \('tpa'"),
    ('bottleneck=0', r"bottleneck='0': accepted values are positive integers"),
    ('data=libri', r"data='libri': accepted values are \('random', 'librispeech'\)"),
    ('data=synthetic_speech/klingon', r"accepted synthetic_speech domains are \('source'"),
    ('model', r"config argument 'model' is not key=value"),
])
def test_bad_adapt_arguments_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    config_lib.adapt_config(arg)


def test_a_list_in_a_config_argument_is_one_value():
  assert config_lib.parse_arg('model=tiny,blocks=1,3,method=lora') == {
      'model': 'tiny', 'blocks': '1,3', 'method': 'lora'}
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, 'tiny.py') + ':blocks=2,3')
  assert c.adapter.blocks == '2,3'
  assert build.adapter_blocks(c) == (2, 3)
  with pytest.raises(ValueError, match=r"'bottleneck' is not key=value .*accepted: key=value"):
    config_lib.parse_arg('blocks=1,bottleneck')


def test_adapt_arguments_reach_the_config():
  c = config_lib.adapt_config('model=2b,method=block_sequential,blocks=16:32,bottleneck=128,'
                              'data=librispeech')
  assert (c.model.dim, c.model.num_blocks) == (1536, 32)
  assert (c.adapter.placement, c.train.trainable) == ('block_sequential', 'adapters')
  assert (c.adapter.blocks, c.adapter.bottleneck) == ('16:32', 128)
  assert (c.data.name, c.data.train_split) == ('librispeech', 'train_clean100')
  assert build.adapter_blocks(c) == tuple(range(16, 32))
  c = config_lib.adapt_config('data=synthetic_speech/target_lang_tiny')
  assert c.data.domains_file == config_lib.TINY_DOMAINS_FILE
  assert config_lib.adapt_config('method=full').adapter.placement == 'none'
