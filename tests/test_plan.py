"""The memory planner: it plans the real step, its figures add up, adapters shrink the weight
state, and bad input is named before anything compiles."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from conftest import tiny_config

from tpa_jax import config as config_lib
from tpa_jax import sharding
from tpa_jax.audio import featurizer as features
from tpa_jax.plan import costs
from tpa_jax.plan import planner
from tpa_jax.train import trainer as trainer_lib

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
# Two seconds of audio keep the tiny step cheap to compile; the giant plans use 30 s.
SECONDS = 2.0


def run_plan(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, 'launch/plan.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_abstract_trainer_lowers_the_same_program_as_the_real_trainer(mesh22):
  config = tiny_config('tpa')
  featurizer = features.Featurizer.from_config(config.features)
  real = trainer_lib.from_config(config, mesh22, featurizer=featurizer)
  abstract = planner.abstract_trainer(config, mesh22, featurizer)
  for a, b in zip(jax.tree.leaves((real.state, real.frozen, real.rest)),
                  jax.tree.leaves((abstract.state, abstract.frozen, abstract.rest))):
    assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
  batch = planner.abstract_batch(config, 8, SECONDS)
  assert real.lower(batch).as_text() == abstract.lower(batch).as_text()


def test_plan_program_prints_a_table_and_a_json_plan():
  result = run_plan('--config=configs/adapt.py:model=tiny,method=tpa,bottleneck=4',
                    '--devices=2', '--accelerator=v5e', f'--seconds={SECONDS}')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert any('weights' in line and 'v5e' in line for line in lines[:-1])  # the table
  plan = json.loads(lines[-1])
  # Default mesh: fsdp over the 2 simulated devices --devices asked for; 8 utterances each.
  assert plan['mesh'] == {'data': 1, 'fsdp': 2, 'tensor': 1}
  assert (plan['batch_size'], plan['per_device_batch']) == (16, 8)
  assert plan['accelerator_bytes'] == 16 * 2 ** 30 and plan['fits'] is True
  assert plan['flops_per_step'] > 0
  b, c = plan['per_device_bytes'], plan['compiled_bytes']
  assert b['total'] == c['argument'] + c['output'] - c['alias'] + c['temp']
  assert b['weights'] + b['gradients'] + b['optimizer'] + b['temp'] == b['total']
  assert min(b.values()) > 0

  # Full fine-tuning on the same mesh (weight state needs no compiling): gradients and optimizer
  # state exist for every weight, and weights are float32 instead of bfloat16.
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=1, devices=jax.devices()[:2])
  full = costs.weight_state_bytes(
      planner.abstract_trainer(config_lib.adapt_config('model=tiny,method=full'), mesh))
  assert b['gradients'] + b['optimizer'] < 0.1 * (full['gradients'] + full['optimizer'])
  assert full['optimizer'] >= 2 * full['gradients'] and full['frozen'] == 0
  assert b['weights'] < 0.6 * full['trainable']  # frozen weights stored in bf16


@pytest.mark.parametrize('args,message', [
    (['--config=configs/adapt.py:model=tiny', '--devices=6', '--mesh=data=4,fsdp=-1'],
     r"--mesh='data=4,fsdp=-1' does not divide 6 devices.*accepted: sizes multiplying to 6"),
    (['--config=configs/adapt.py:model=tiny', '--devices=4', '--per_device_batch=0',
      '--config.train.batch_size=6'],
     r'train.batch_size=6 does not divide over grad_accum_steps x data x fsdp = 1 x 4; '
     r'accepted: multiples of 4'),
    (['--config=configs/adapt.py:model=tiny', '--accelerator=tpu9'],
     r'--accelerator=tpu9: value should be one of <v4\|v5e\|v5p\|v6e\|h100\|h200>'),
    (['--config=configs/adapt.py:model=3b'],
     r"model='3b': accepted presets are \('tiny', 'demo', 'bench', '600m', '2b', '8b'\)"),
    (['--config=configs/adapt.py:model=tiny', '--config.train.batch_sise=8'],
     r"--config.train.batch_sise: config.train has no field 'batch_sise'; accepted fields of "
     r"config.train: \['batch_size'"),
])
def test_bad_input_is_named_before_compiling(args, message):
  result = run_plan(*args)
  assert result.returncode != 0
  assert re.search(message, result.stderr), result.stderr[-3000:]
  assert result.stdout.strip() == ''  # no plan, not even a table row


def test_bad_meshes_and_accelerators_are_named_in_the_library():
  with pytest.raises(ValueError, match=r"mesh axis 'model' in --mesh='model=4': accepted axes "
                                       r"are \('data', 'fsdp', 'tensor'\)"):
    planner.parse_mesh('model=4', 4)
  with pytest.raises(ValueError, match=r"only one axis may be -1"):
    planner.parse_mesh('data=-1,fsdp=-1', 4)
  assert planner.parse_mesh('data=2,fsdp=-1', 8) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  with pytest.raises(ValueError, match=r"accelerator 'tpu9': accepted values are \('v4'"):
    planner.accelerator_bytes('tpu9')
  # A weight dimension the fsdp axis does not divide (tiny: dim 32 over 3 devices).
  mesh = sharding.make_mesh(data=1, fsdp=3, tensor=1, devices=jax.devices()[:3])
  with pytest.raises(ValueError,
                     match=r"splits a dimension of 32 over mesh axes \('fsdp',\) = 3 devices"):
    planner.abstract_trainer(tiny_config('tpa'), mesh)
