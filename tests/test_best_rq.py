"""BEST-RQ's pieces: fixed, padding-independent quantizer targets with no optimizer state, span
masks over valid frames, a loss of masked frames only, and named errors for bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_config
from tpa_jax import sharding
from tpa_jax.audio.featurizer import featurizer as make_featurizer
from tpa_jax.config.ssl import ssl_fields
from tpa_jax.errors import ConfigError
from tpa_jax.nn import best_rq
from tpa_jax.nn.params import FixedArray
from tpa_jax.train import partition
from tpa_jax.train.losses import masked_prediction_loss


def ssl_config(**overrides):
  config = tiny_config('full')
  with config.unlocked():
    config.ssl = ssl_fields()
  config.ssl.update({**dict(codebook_size=16, code_dim=4, num_codebooks=2, mask_prob=0.2,
                            mask_span=3), **overrides})
  return config


def test_targets_are_fixed_for_a_seed_independent_of_padding_and_have_no_optimizer_state(mesh1):
  config = ssl_config()
  settings = best_rq.Settings.from_config(config)
  assert settings.stack == 4  # the tiny model's conv2d frontend: stride 2, 2 layers
  quantizer = lambda seed: best_rq.RandomProjectionQuantizer(
      config.model.frontend.input_dim, settings, rngs=nnx.Rngs(params=seed))
  featurizer = make_featurizer(config)
  rng = np.random.default_rng(0)
  audio = rng.normal(0, 3000, 12000).astype(np.int16)
  targets = {}
  for pad in (0, 6000):  # the same utterance alone, and padded with other audio after it
    padded = np.concatenate([audio, rng.normal(0, 3000, pad).astype(np.int16)])
    features, mask = featurizer(padded[None], np.array([len(audio)], np.int32))
    t, m = quantizer(0)(features, mask)
    targets[pad] = np.asarray(t)[0][np.asarray(m)[0]]
  assert targets[0].shape == (featurizer.frames(12000) // 4, 2)
  np.testing.assert_array_equal(targets[0], targets[6000])
  assert len(np.unique(targets[0])) > 2  # the codebook is used, not one entry
  # Deterministic for a seed, different for another.
  q0, q0b, q1 = quantizer(0), quantizer(0), quantizer(1)
  np.testing.assert_array_equal(q0.projection[...], q0b.projection[...])
  assert not np.array_equal(q0.projection[...], q1.projection[...])
  np.testing.assert_allclose(np.linalg.norm(q0.codebooks[...], axis=-1), 1.0, rtol=1e-5)

  # Beside trainable weights (full training), the fixed arrays get no gradient and no
  # optimizer state: no trainable filter matches them.
  class Pretraining(nnx.Module):
    def __init__(self):
      self.quantizer = quantizer(0)
      self.heads = best_rq.PredictionHeads(config.model.dim, settings, rngs=nnx.Rngs(params=1))
  model = sharding.create_sharded(Pretraining, mesh1)
  for name in ('full', 'head'):
    trainable = nnx.state(model, partition.trainable_filter(name))
    paths = [p for p, _ in nnx.to_flat_state(trainable)]
    assert paths and not any('quantizer' in p for p in paths), paths
    opt_paths = jax.tree_util.tree_leaves_with_path(optax.adamw(1e-3).init(trainable))
    assert not any('quantizer' in jax.tree_util.keystr(p) for p, _ in opt_paths)
  frozen = nnx.state(model, partition.frozen_filter(partition.trainable_filter('full')))
  assert not jax.tree.leaves(frozen)  # not a frozen weight either: fixed state of the run
  assert len(jax.tree.leaves(nnx.state(model, FixedArray))) == 2


def test_span_masks_cover_valid_frames_only_with_at_least_one_span():
  valid = np.zeros((64, 50), bool)
  lengths = np.random.default_rng(0).integers(5, 51, 64)
  for i, n in enumerate(lengths):
    valid[i, :n] = True
  masked = np.asarray(best_rq.span_mask(jax.random.key(0), jnp.asarray(valid), 0.05, 4))
  assert not (masked & ~valid).any()
  assert masked.any(-1).all()  # every utterance trains
  fraction = masked.sum() / valid.sum()
  assert 0.1 < fraction < 0.35  # about 1 - (1 - 0.05) ** 4 = 0.19, plus forced spans
  # Spans: a masked run is at least 4 frames unless the utterance ends (or begins) it.
  for row, v in zip(masked, valid):
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], row, [0]]).astype(int))))[::2]
    assert (runs >= 4).all() or v.sum() < 8 or row[v.sum() - 1]
  features = jnp.ones((2, 20, 3))
  noisy = best_rq.mask_features(jax.random.key(1), features, jnp.asarray(
      [[True, False, False, False, True], [False] * 5]), 4, 0.1)
  changed = np.asarray((noisy != 1).any(-1))
  np.testing.assert_array_equal(changed[0], np.repeat([True, False, False, False, True], 4))
  assert not changed[1].any()


def test_the_loss_counts_masked_frames_only():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 10, 2, 16)), jnp.float32)
  targets = rng.integers(0, 16, (2, 10, 2))
  masked = np.zeros((2, 10), bool)
  masked[0, 2:5] = masked[1, 7:9] = True
  loss, metrics = masked_prediction_loss(logits, jnp.asarray(targets), masked)
  other = targets.copy()
  other[~masked] = (other[~masked] + 1) % 16  # every unmasked target changed
  loss2, _ = masked_prediction_loss(logits, jnp.asarray(other), masked)
  assert float(loss2) == float(loss)
  other[0, 3, 1] = (other[0, 3, 1] + 1) % 16  # one masked target changed
  loss3, _ = masked_prediction_loss(logits, jnp.asarray(other), masked)
  assert float(loss3) != float(loss)
  assert float(metrics['masked_frames']) == 5 and metrics['accuracy'].shape == (2,)
  # Perfect logits at masked frames: loss near 0 and accuracy 1.
  perfect = jax.nn.one_hot(targets, 16) * 50.0
  loss4, m4 = masked_prediction_loss(perfect, jnp.asarray(targets), masked)
  assert float(loss4) < 1e-6 and np.allclose(m4['accuracy'], 1.0)


@pytest.mark.parametrize('field, value, message', [
    ('mask_prob', 0.0, r'ssl.mask_prob=0.0: a probability in \(0, 1\) is accepted'),
    ('mask_prob', 1.5, r'ssl.mask_prob=1.5'),
    ('codebook_size', 1, r'ssl.codebook_size=1: an integer >= 2 is accepted'),
    ('stack', 3, r'ssl.stack=3: .*the conv2d frontend stacks 4 feature frames per encoder frame '
                 r'\(accepted: 0 or 4\)'),
    ('mask_span', 40, r'ssl.mask_span=40 encoder frames is longer than the shortest bucket '
                      r'\(24 encoder frames\); accepted: 1 .. 24'),
])
def test_bad_settings_are_named(field, value, message):
  config = ssl_config(**{field: value})
  with pytest.raises(ConfigError, match=message):
    best_rq.Settings.from_config(config, shortest_frames=24)
