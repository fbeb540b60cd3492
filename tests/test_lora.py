"""LoRA: identity at init, only LoRA and head weights train, merged inference equals unmerged;
and removing adapters from blocks without retraining."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ctc_batch, tiny_config
from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.nn import adapters as adapters_lib
from tpa_jax.nn import build, lora
from tpa_jax.nn.params import AdapterParam, HeadParam, LoRAParam
from tpa_jax.train import trainer as trainer_lib


def lora_config(**overrides):
  return tiny_config('lora', **{'adapter.bottleneck': 2, 'adapter.lora_alpha': 4.0,
                                **overrides})


def inputs(config, seed=0):
  batch = ctc_batch(config, seed=seed)
  return batch['features'], batch['feature_mask']


def perturbed(model, variable_type, scale=0.05, seed=3):
  """`model` with noise added to its variables of `variable_type` (a trained-looking state)."""
  state = nnx.state(model, variable_type)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))
  return model


def test_lora_is_the_base_at_init_and_trains_only_lora_and_head(mesh1):
  config = lora_config()
  model = build.create_model(config, mesh1)
  base = build.create_model(tiny_config('head'), mesh1)  # same seed: same base and head
  x, mask = inputs(config)
  np.testing.assert_allclose(model(x, mask)[0], base(x, mask)[0], atol=1e-5)
  # B is zero, A is not: the update is exactly zero at step 0, and can grow.
  state = nnx.state(model, LoRAParam)
  kernels = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(state)}
  b = [v for k, v in kernels.items() if "['b']" in k]
  a = [v for k, v in kernels.items() if "['a']" in k]
  assert b and all((np.asarray(v) == 0).all() for v in b)
  assert all(np.abs(np.asarray(v)).sum() > 0 for v in a)
  # q, k, v, out, ffn1 up/down, ffn2 up/down: 8 updates, each stacked over the 4 blocks.
  assert len(a) == len(b) == 8 and all(v.shape[0] == config.model.num_blocks for v in a)

  trainer = trainer_lib.from_config(config, mesh1)
  types = {type(v) for v in jax.tree.leaves(trainer.state.trainable,
                                            is_leaf=lambda v: isinstance(v, nnx.Variable))}
  assert types == {LoRAParam, HeadParam}
  frozen_before = jax.tree.map(np.asarray, trainer.frozen)
  trainable_before = jax.tree.map(np.asarray, trainer.state.trainable)
  for seed in range(3):
    trainer.step(ctc_batch(config, seed=seed))
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, trainer.frozen))
  changed = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), trainer.state.trainable,
                         trainable_before)
  assert all(jax.tree.leaves(changed))  # every LoRA factor and the head moved


def test_merged_lora_equals_unmerged(mesh1):
  config = lora_config(**{'adapter.blocks': '1:4', 'adapter.lora_targets': 'q,v,ffn2'})
  model = perturbed(build.create_model(config, mesh1), LoRAParam)
  x, mask = inputs(config)
  unmerged = np.asarray(model(x, mask)[0])
  merged = lora.merge(model)
  assert merged.encoder.adapters is None and not jax.tree.leaves(nnx.state(merged, LoRAParam))
  base = build.create_model(tiny_config('head'), mesh1)
  assert np.abs(unmerged - np.asarray(base(x, mask)[0])).max() > 1e-3  # LoRA changes outputs
  np.testing.assert_allclose(np.asarray(merged(x, mask)[0]), unmerged, atol=2e-5, rtol=1e-5)


def test_lora_spec_fields_and_bad_input(mesh1):
  config = lora_config()
  spec = spec_lib.from_config(config, 'f' * 16)
  assert spec.placement == 'lora' and spec.bottleneck == 2 and spec.lora_alpha == 4.0
  assert spec.lora_targets == ('q', 'k', 'v', 'out', 'ffn1_up', 'ffn1_down', 'ffn2_up',
                               'ffn2_down')
  other = spec_lib.from_config(lora_config(**{'adapter.lora_targets': 'attention'}), 'f' * 16)
  assert any('adapter.lora_targets' in line for line in spec_lib.differences(spec, other))
  assert spec_lib.AdapterSpec.from_json(spec.to_json()) == spec
  with pytest.raises(ValueError, match=r"lora_targets names 'mlp'.*accepted names"):
    build.create_model(lora_config(**{'adapter.lora_targets': 'q,mlp'}), mesh1)
  with pytest.raises(ValueError, match='lora_alpha=0.0: must be a positive number'):
    build.create_model(lora_config(**{'adapter.lora_alpha': 0.0}), mesh1)


@pytest.mark.parametrize('method', ['tpa', 'block_sequential', 'lora'])
def test_removing_adapters_without_retraining_equals_a_model_with_the_kept_ones(mesh1, method):
  """TPA over every block with the adapters of the lowest k removed gives what a model built with
  adapters on the other blocks only, carrying the same weights, gives."""
  config = tiny_config(method, **{'adapter.bottleneck': 4})
  model = perturbed(build.create_model(config, mesh1), AdapterParam)
  x, mask = inputs(config)
  full_out = np.asarray(model(x, mask)[0])
  pruned = adapters_lib.without_blocks(model, (0, 1))
  np.testing.assert_array_equal(np.asarray(model(x, mask)[0]), full_out)  # a copy was pruned
  kept = build.create_model(tiny_config(method, **{'adapter.bottleneck': 4,
                                                   'adapter.blocks': '2:4'}), mesh1)
  # The kept model carries the same base, head and (for blocks 2, 3) adapter weights.
  nnx.update(kept, nnx.state(model, nnx.Not(AdapterParam)))
  nnx.update(kept.encoder.adapters,
             jax.tree.map(lambda w: w[2:], nnx.state(model.encoder.adapters)))
  expected = np.asarray(kept(x, mask)[0])
  np.testing.assert_allclose(np.asarray(pruned(x, mask)[0]), expected, atol=1e-5, rtol=1e-5)
  assert np.abs(full_out - expected).max() > 1e-4  # the removed adapters did something
