"""The adapter-only sharded train step: frozen stays frozen, sharded == unsharded, it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ctc_batch, tiny_config
from flax import nnx

from tpa_jax import sharding
from tpa_jax.data import batches as batches_lib
from tpa_jax.data import random_task
from tpa_jax.nn import build
from tpa_jax.plan import costs
from tpa_jax.train import optim
from tpa_jax.train import step as train_step
from tpa_jax.train import trainer as trainer_lib


def make_trainer(config, mesh, *, frozen_dtype=jnp.bfloat16, learning_rate=3e-3, seed=0,
                 **optim_kw):
  model = build.create_model(config, mesh, seed=seed)
  optimizer, schedule = optim.make_optimizer(learning_rate=learning_rate, warmup_steps=0,
                                             schedule='constant', **optim_kw)
  return trainer_lib.create_trainer(model, optimizer, schedule, task=config.head.kind,
                                   trainable=config.train.trainable, frozen_dtype=frozen_dtype,
                                   mesh=mesh)


def host(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def paths(tree):
  return {tuple(str(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def update_difference(before, after_a, after_b):
  """(relative difference of two updates over all weights, the weight contributing most, the
  weights that moved). Whole-update norms, since a weight whose exact gradient is 0 (such as an
  attention key bias) has only rounding noise to compare and per-weight ratios mean nothing."""
  diffs, norms = {}, {}
  for (path, b), a1, a2 in zip(paths(before).items(), jax.tree.leaves(host(after_a)),
                               jax.tree.leaves(host(after_b))):
    d1, d2 = (a1 - b).astype(np.float64), (a2 - b).astype(np.float64)
    diffs[path], norms[path] = np.sum((d1 - d2) ** 2), np.sum(d1 ** 2)
  rel = np.sqrt(sum(diffs.values()) / sum(norms.values()))
  return rel, max(diffs, key=diffs.get), {p for p, n in norms.items() if n > 0}


def run_steps(trainer, n, seed=0):
  metrics = []
  for i in range(n):
    m = trainer.step(ctc_batch(tiny_config(), seed=seed + i))
    metrics.append(jax.tree.map(float, jax.block_until_ready(m)))
  return metrics


@pytest.mark.parametrize('method,blocks', [('tpa', 'all'), ('block_sequential', '2:4')])
def test_frozen_weights_bit_identical_and_every_adapter_weight_changes(method, blocks, mesh22):
  trainer = make_trainer(tiny_config(method, **{'adapter.blocks': blocks}), mesh22)
  frozen_before, trainable_before = host(trainer.frozen), host(trainer.state.trainable)
  metrics = run_steps(trainer, 5)
  assert all(m['applied'] == 1.0 for m in metrics)
  frozen_after = host(trainer.frozen)
  assert jax.tree.structure(frozen_after) == jax.tree.structure(frozen_before)
  for (path, a), b in zip(paths(frozen_before).items(), jax.tree.leaves(frozen_after)):
    np.testing.assert_array_equal(a, b, err_msg=f'frozen weight {path} changed')
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen_after))
  for (path, a), b in zip(paths(trainable_before).items(),
                          jax.tree.leaves(host(trainer.state.trainable))):
    # Per stacked layer: every adapter of every block moved, not just some slice of the stack.
    changed = (a != b).reshape(a.shape[0], -1).any(-1) if 'adapters' in str(path) else (a != b).any()
    assert np.all(changed), f'trainable weight {path} did not change'
  assert int(trainer.state.step) == 5


def test_optimizer_state_has_no_leaf_for_a_frozen_weight(mesh22):
  trainer = make_trainer(tiny_config('tpa'), mesh22)
  trainable_paths = set(paths(trainer.state.trainable))
  frozen_paths = set(paths(trainer.frozen))
  n_moments = 0
  for path, leaf in paths(trainer.state.opt_state).items():
    if leaf.ndim == 0:
      continue  # step counts
    owners = [p for p in trainable_paths | frozen_paths if path[-len(p):] == p]
    assert owners and all(p in trainable_paths for p in owners), path
    n_moments += 1
  assert n_moments == 2 * len(trainable_paths)  # Adam's mu and nu, for trainable weights only
  trainable_size = sum(x.size for x in jax.tree.leaves(trainer.state.trainable))
  opt_size = sum(x.size for x in jax.tree.leaves(trainer.state.opt_state))
  assert opt_size < 2 * trainable_size + 16
  frozen_size = sum(x.size for x in jax.tree.leaves(trainer.frozen))
  assert frozen_size > 0


@pytest.mark.parametrize('method,axes', [('tpa', 'data=2,fsdp=2'), ('full', 'data=2,fsdp=2'),
                                         ('tpa', 'data=1,fsdp=2,tensor=2'),
                                         ('full', 'data=1,fsdp=2,tensor=2')])
def test_sharded_step_equals_unsharded(method, axes, mesh1):
  config = tiny_config(method)
  mesh = sharding.make_mesh(**sharding.parse_mesh(axes, 4))
  # Adam's first update is lr·g/(|g| + eps): with a tiny eps it turns rounding noise in gradients
  # that are zero in exact arithmetic (e.g. attention key biases) into full ±lr steps. An eps
  # above that noise keeps the updates a faithful image of the gradients being compared.
  single = make_trainer(config, mesh1, frozen_dtype=None, eps=1e-4)
  sharded = make_trainer(config, mesh, frozen_dtype=None, eps=1e-4)
  assert sharded.state.trainable != {} and len(sharded.mesh.devices.flat) == 4
  before = host(single.state.trainable)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(host(sharded.state.trainable))):
    np.testing.assert_array_equal(a, b)  # same init whatever the mesh
  batch = ctc_batch(config)
  m1 = jax.tree.map(float, jax.block_until_ready(single.step(batch)))
  m2 = jax.tree.map(float, jax.block_until_ready(sharded.step(batch)))
  for key in ('loss', 'grad_norm'):
    assert abs(m1[key] - m2[key]) <= 1e-5 * abs(m1[key]), (key, m1[key], m2[key])
  rel, worst, moved = update_difference(before, single.state.trainable, sharded.state.trainable)
  assert rel <= 1e-5, f'relative difference of updates {rel:.2e}, mostly in {worst}'
  assert any('head' in str(p) for p in moved) and len(moved) >= 4, moved
  # The updated states also agree on the next batch's loss.
  batch = ctc_batch(config, seed=1)
  l1, l2 = (float(t.step(batch)['loss']) for t in (single, sharded))
  assert abs(l1 - l2) <= 1e-5 * abs(l1)


@pytest.mark.parametrize('method', ['tpa', 'full'])
def test_loss_decreases_on_a_learnable_problem(method, mesh1):
  # Five tokens, each a 16-bin band: learnable from a random frozen base in a few dozen steps.
  config = tiny_config(method, **{'head.vocab_size': 6})
  trainer = make_trainer(config, mesh1, learning_rate=1e-2 if method == 'tpa' else 3e-3)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(40):
    batch = random_task.ctc_batch(rng, batch_size=8, num_frames=64, input_dim=80,
                                vocab_size=config.head.vocab_size, num_labels=6)
    losses.append(float(jax.block_until_ready(trainer.step(batch))['loss']))
  first, last = np.mean(losses[:3]), np.mean(losses[-3:])
  # Well below what blank/unigram priors alone reach (about 60% of the initial loss here).
  assert last < 0.3 * first, (method, first, last)


def test_classification_loss_decreases(mesh1):
  config = tiny_config('tpa', **{'head.kind': 'classification', 'head.num_classes': 4})
  trainer = make_trainer(config, mesh1)
  rng = np.random.default_rng(0)
  losses, accs = [], []
  for _ in range(30):
    batch = random_task.classification_batch(rng, batch_size=8, num_frames=48, input_dim=80,
                                           num_classes=4)
    m = jax.tree.map(float, trainer.step(batch))
    losses.append(m['loss'])
    accs.append(m['accuracy'])
  assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
  assert np.mean(accs[-3:]) > 0.9


def test_non_finite_step_is_not_applied(mesh1):
  trainer = make_trainer(tiny_config('tpa'), mesh1)
  before = host(trainer.state.trainable)
  batch = ctc_batch(tiny_config())
  batch['features'][0, 0, 0] = np.nan
  metrics = jax.tree.map(float, trainer.step(batch))
  assert metrics['applied'] == 0.0 and not np.isfinite(metrics['loss'])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(host(trainer.state.trainable))):
    np.testing.assert_array_equal(a, b)


def test_bad_training_setups_are_named(mesh1, mesh22):
  with pytest.raises(ValueError, match="train.trainable='adapters' but the model has no adapters"):
    make_trainer(tiny_config('tpa', **{'adapter.placement': 'none'}), mesh1)
  with pytest.raises(ValueError, match=r"train.trainable='lora'.*'adapters', 'head', 'full'"):
    make_trainer(tiny_config('tpa', **{'train.trainable': 'lora'}), mesh1)
  trainer = make_trainer(tiny_config('tpa'), mesh22)
  with pytest.raises(ValueError, match='batch size 3 is not divisible by .* data x fsdp = 4'):
    trainer.step(ctc_batch(tiny_config(), batch_size=3))


def test_scanned_step_never_differentiates_the_frozen_segment(mesh1):
  """Layers scanned (where JAX cannot prune a frozen block from a single scan's backward pass):
  with adapters on the upper half, the step's FLOPs (every scan body counted per layer) are at
  most 0.55 of full fine-tuning's, whose backward pass covers every block."""
  def flops(method, **overrides):
    config = tiny_config(method, **{'model.scan_layers': True, **overrides})
    trainer = trainer_lib.from_config(config, mesh1)
    with jax.set_mesh(mesh1):
      return costs.jaxpr_flops(trainer.step_fn, trainer.state, trainer.frozen, trainer.rest,
                               ctc_batch(config))
  upper = flops('tpa', **{'adapter.blocks': '2:4', 'adapter.bottleneck': 4})
  full = flops('full')
  assert upper <= 0.55 * full, upper / full


def test_gradients_never_enter_the_frozen_segment(mesh1):
  """With adapters from block 2 up, the differentiated program holds no work for blocks 0-1:
  fewer FLOPs than adapters everywhere, by about the backward pass of two blocks."""
  def flops(blocks):
    config = tiny_config('tpa', **{'adapter.blocks': blocks, 'model.scan_layers': False})
    trainer = make_trainer(config, mesh1)
    return trainer.frozen_depth, trainer.lower(ctc_batch(config)).cost_analysis()['flops']
  (depth_all, all_blocks), (depth_upper, upper) = flops('all'), flops('2:4')
  assert (depth_all, depth_upper) == (0, 2)
  # Adapters everywhere: ~3 units of work per block (forward + activation backward + adapters);
  # upper half: blocks 0-1 forward only.
  assert upper < 0.8 * all_blocks


def test_bad_batches_are_named_before_compiling(mesh1):
  trainer = make_trainer(tiny_config('tpa'), mesh1)
  batch = ctc_batch(tiny_config())
  with pytest.raises(TypeError, match='labels must have rank 2 and an integer dtype'):
    trainer.step({**batch, 'labels': batch['labels'].astype(np.float32)})
  with pytest.raises(KeyError, match="needs 'label_mask'"):
    trainer.step({k: v for k, v in batch.items() if k != 'label_mask'})
  with pytest.raises(TypeError, match='feature_mask must be bool'):
    trainer.step({**batch, 'feature_mask': batch['feature_mask'].astype(np.int32)})
  assert trainer._executables == {}  # nothing was compiled for a bad batch
  assert int(trainer.state.step) == 0


def test_remat_policies_compute_the_same_step(mesh1):
  results = {}
  for policy in ('none', 'full', 'dots_no_batch'):
    trainer = make_trainer(tiny_config('tpa', **{'model.remat_policy': policy}), mesh1,
                           frozen_dtype=None, eps=1e-4)
    before = host(trainer.state.trainable)
    metrics = jax.tree.map(float, trainer.step(ctc_batch(tiny_config())))
    results[policy] = metrics['loss'], metrics['grad_norm'], host(trainer.state.trainable)
  loss, gnorm, params = results['none']
  for policy, (l, g, p) in results.items():
    assert abs(l - loss) <= 1e-5 * loss and abs(g - gnorm) <= 1e-5 * gnorm, policy
    rel, worst, _ = update_difference(before, params, p)
    assert rel <= 1e-5, (policy, rel, worst)


def make_accum_trainer(config, mesh, steps):
  model = build.create_model(config, mesh)
  optimizer, schedule = optim.make_optimizer(learning_rate=3e-3, warmup_steps=0,
                                             schedule='constant', eps=1e-4)
  return trainer_lib.create_trainer(model, optimizer, schedule, task=config.head.kind,
                                   trainable=config.train.trainable, frozen_dtype=None,
                                   mesh=mesh, grad_accum_steps=steps)


def test_accumulated_step_equals_one_step_on_the_whole_batch(mesh22):
  config = tiny_config('tpa')
  # Utterances with 1 to 6 tokens: micro-batches hold different token counts, so averaging
  # their per-token losses with equal weights would not give the batch's loss.
  batch = random_task.ctc_batch(np.random.default_rng(3), batch_size=8, num_frames=64,
                              input_dim=80, vocab_size=config.head.vocab_size, num_labels=6,
                              min_fraction=0.1)
  tokens = [batch['label_mask'][j::2].sum() for j in range(2)]
  assert tokens[0] != tokens[1], tokens  # so the test can tell the weighting apart
  whole = make_accum_trainer(config, mesh22, 1)
  accum = make_accum_trainer(config, mesh22, 2)
  before = host(whole.state.trainable)
  m1 = jax.tree.map(float, jax.block_until_ready(whole.step(batch)))
  m2 = jax.tree.map(float, jax.block_until_ready(accum.step(batch)))
  for key in ('loss', 'grad_norm', 'tokens'):
    assert abs(m1[key] - m2[key]) <= 1e-5 * abs(m1[key]), (key, m1[key], m2[key])
  rel, worst, moved = update_difference(before, whole.state.trainable, accum.state.trainable)
  assert rel <= 1e-5, f'relative difference of updates {rel:.2e}, mostly in {worst}'
  assert len(moved) >= 4

  # 8 rows split over 2 micro-batches x 4 devices; 4 rows cannot, and nothing is compiled.
  with pytest.raises(ValueError, match=r'batch size 4 is not divisible by train.grad_accum_steps '
                                       r'x the data-parallel mesh axes data x fsdp = 2 x 4 = 8'):
    accum.step(ctc_batch(config, batch_size=4))
  assert len(accum._executables) == 1
  with pytest.raises(ValueError, match=r'train.grad_accum_steps=0: accepted values are positive'):
    train_step.make_train_step(accum.graphdef, None, None, task='ctc', frozen_depth=0,
                               grad_accum_steps=0)


def test_audio_is_featurized_per_device_exactly_as_on_one(mesh22):
  """The step computes each device's rows of features on that device (the FFT would otherwise
  gather the global batch onto every device); SpecAugment stays drawn for the whole batch."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from tpa_jax.audio import featurizer as features_lib
  featurizer = features_lib.Featurizer.from_config(tiny_config().features)
  rng = np.random.default_rng(0)
  audio = rng.integers(-3000, 3000, (4, 8000)).astype(np.int16)
  lengths = np.array([8000, 6000, 4000, 7000], np.int32)
  key = jax.random.key(5)
  expected = jax.jit(featurizer)(jnp.asarray(audio), jnp.asarray(lengths), key)
  rows = NamedSharding(mesh22, P(('data', 'fsdp')))
  with jax.set_mesh(mesh22):
    got = jax.jit(lambda a, n: batches_lib.batch_inputs({'audio': a, 'audio_lengths': n},
                                                        featurizer, key))(
        jax.device_put(audio, rows), jax.device_put(lengths, rows))
  for e, g in zip(expected, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)
  assert not np.all(np.asarray(got[0]) == np.asarray(featurizer(audio, lengths)[0]))  # augmented


def test_bf16_compute_stays_close_to_float32(mesh1):
  """Compute in bf16 (frozen weights stored in bf16, attention scores and head logits
  accumulated in float32): on the same weights, the tiny model's logits stay within 5% of their
  largest magnitude and its loss within 0.1% of the float32 model's (measured: 2.2% and
  0.009%)."""
  config = tiny_config('tpa', **{'adapter.up_init': 'normal'})
  f32 = make_trainer(config, mesh1, frozen_dtype=None)
  bf16 = make_trainer(tiny_config('tpa', **{'adapter.up_init': 'normal',
                                            'model.dtype': 'bfloat16'}),
                      mesh1, frozen_dtype=jnp.bfloat16)
  batch = ctc_batch(config)
  features, mask = jnp.asarray(batch['features']), jnp.asarray(batch['feature_mask'])
  with jax.set_mesh(mesh1):
    logits32, _ = nnx.jit(lambda m: m(features, mask))(f32.model())
    logits16, _ = nnx.jit(lambda m: m(features, mask))(bf16.model())
  assert logits16.dtype == jnp.float32  # the head accumulates in float32
  scale = float(jnp.abs(logits32).max())
  assert float(jnp.abs(logits16 - logits32).max()) <= 0.05 * scale
  loss32, loss16 = (float(t.step(batch)['loss']) for t in (f32, bf16))
  assert abs(loss16 - loss32) <= 1e-3 * loss32, (loss16, loss32)
