"""A batch on the mesh and what it feeds the model: every batch array is split on its leading
axis over the data-parallel mesh axes, and a batch carries either features or audio that is
featurized on device (per device's rows). The train step and the evaluators share these."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from tpa_jax import sharding
from tpa_jax.audio.featurizer import Featurizer
from tpa_jax.audio.spec_augment import spec_augment

# A batch carries either features or audio (featurized on device by the program that reads it).
INPUT_KEYS = (('features', 'feature_mask'), ('audio', 'audio_lengths'))


def batch_shardings(batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  """Every batch array is split on its leading (batch) axis over the data-parallel mesh axes."""
  return {k: sharding.named(mesh, ('batch',) + (None,) * (len(v.shape) - 1))
          for k, v in batch.items()}


def batch_inputs(batch: dict[str, jax.Array], featurizer: Featurizer | None,
                 key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(features, mask) of a batch: given, or computed from `audio` on device (SpecAugment when
  `key` is given)."""
  if 'audio' in batch:
    if featurizer is None:
      raise ValueError('a batch with audio needs a featurizer (config.features)')
    features, mask = _featurize_rows(featurizer, batch['audio'], batch['audio_lengths'])
    if key is not None and featurizer.spec_augment:
      # As Featurizer.__call__ with a key: SpecAugment on the normalised features, drawn for
      # the whole batch, so the masks do not depend on how the batch is split.
      f = featurizer
      features = spec_augment(
          key, features, mask, num_freq_masks=f.num_freq_masks, max_freq_width=f.max_freq_width,
          num_time_masks=f.num_time_masks, max_time_fraction=f.max_time_fraction,
          max_time_width=f.max_time_width)
    return features, mask
  return batch['features'], batch['feature_mask']


def _featurize_rows(featurizer: Featurizer, audio_bs: jax.Array,
                    lengths_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Features of each device's rows, computed on that device (they are per utterance). Left to
  the partitioner, the FFT gathers the whole global batch onto every device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return featurizer(audio_bs, lengths_b)
  rows = sharding.logical_to_spec(('batch',), mesh_axis_names=mesh.axis_names)[0]
  return jax.shard_map(lambda a, n: featurizer(a, n), mesh=mesh,
                       in_specs=(P(rows, None), P(rows)),
                       out_specs=(P(rows, None, None), P(rows, None)))(audio_bs, lengths_b)
