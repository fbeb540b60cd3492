"""Logical-axis rules, meshes, and where the weights of a sharded model actually live."""

import jax
import pytest

from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from tpa_jax import sharding
from tpa_jax.nn import build


def test_rules_use_each_mesh_axis_once():
  assert sharding.logical_to_spec(('batch', 'time', 'embed')) == P(('data', 'fsdp'), None, None)
  assert sharding.logical_to_spec(('embed', 'mlp')) == P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('layers', 'embed', 'heads', 'kv')) == P(None, 'fsdp', 'tensor',
                                                                           None)
  assert sharding.logical_to_spec(('batch', 'time', 'mlp'), mesh_axis_names=('data', 'tensor')) \
      == P('data', None, 'tensor')


def test_bad_rules_and_meshes_are_named():
  with pytest.raises(ValueError, match="unknown logical axis 'width'"):
    sharding.validate_rules([('width', 'fsdp')])
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.validate_rules([('embed', 'model')])
  with pytest.raises(ValueError, match='does not divide 4 devices'):
    sharding.make_mesh(data=-1, fsdp=3)
  with pytest.raises(ValueError, match='needs 8 devices, 4 are available'):
    sharding.make_mesh(data=2, fsdp=2, tensor=2)
  with pytest.raises(ValueError, match='mesh.tensor=0'):
    sharding.make_mesh(data=-1, tensor=0)
  assert dict(sharding.make_mesh(data=-1, tensor=2).shape) == {'data': 2, 'fsdp': 1, 'tensor': 2}


def test_weights_are_created_in_their_shards():
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
  model = build.create_model(tiny_config('tpa'), mesh)
  kernel = model.encoder.blocks.ffn1.up.kernel[...]  # [layers, embed, mlp] = [4, 32, 64]
  assert kernel.sharding.spec == P(None, 'fsdp', 'tensor')
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 16, 32)}
  down = model.encoder.adapters.slots['ffn2'].down.kernel[...]  # [layers, embed, adapter]
  assert down.sharding.spec == P(None, 'fsdp', None)
  assert len(jax.devices()) == 4
