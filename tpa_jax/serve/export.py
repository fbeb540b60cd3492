"""Exports of a trained run: its adapter file (the format: `tpa_jax/checkpoint/adapter_file.py`),
and self-contained serving bundles.

Serving bundle (a directory): `function.jaxexport`, the inference function features -> logits
serialised with `jax.export` (batch and frame counts symbolic), `weights.safetensors` with every
array it needs, and `manifest.json`. `tpa_jax/serve/serving_loader.py` loads and runs it with jax,
numpy and safetensors alone.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_np

from tpa_jax import checkpoint, sharding
from tpa_jax.checkpoint import adapter_file
from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.errors import CheckpointError, SpecMismatchError
from tpa_jax.eval import decoding
from tpa_jax.serve import bank as bank_lib
from tpa_jax.serve import multitask, serving_loader
from tpa_jax.train import trainer as trainer_lib

BUNDLE_FORMAT = 'tpa_jax.serving/1'


def load_run(workdir: str, mesh: jax.sharding.Mesh | None = None):
  """(config, model, trainable state, run info, step) of the newest committed checkpoint of the
  run in `workdir`: the base rebuilt as the run built it, with the trained state restored, on
  `mesh` (default: every device here on the data axis, whatever mesh trained the run)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise CheckpointError(f'no checkpoints in {workdir} (looked for {directory})')
  ckpt = checkpoint.RunCheckpointer(directory, async_save=False, read_only=True)
  try:
    if not ckpt.committed_steps():
      raise CheckpointError(f'no committed checkpoint in {directory}')
    config = ml_collections.ConfigDict(ckpt.newest_run_info()['config'])
    mesh = mesh if mesh is not None else sharding.make_mesh()
    trainer = trainer_lib.from_config(config, mesh)
    current = spec_lib.from_config(config, trainer.base_fingerprint['id'])
    step, trainer.state, _, info = ckpt.restore_latest(
        trainer.state, check=lambda i: checkpoint.check_run(i, current, directory))
  finally:
    ckpt.close()
  return config, trainer.model(), trainer.state.trainable, info, step


def export_adapters(workdir: str, output: str, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Writes the run's trained arrays to the safetensors file `output`, with the adapter spec
  that attaching them checks and what decodes the head's outputs (the tokenizer of a CTC head,
  the class names of a classifier); returns its metadata."""
  config, _, trainable, info, step = load_run(workdir, mesh)
  return adapter_file.write_adapters(
      output, adapter_file.flat_arrays(trainable), config, checkpoint.saved_spec(info),
      info['base_fingerprint'], step, **decoding_of(config, workdir, mesh or sharding.make_mesh()))


def decoding_of(config: ml_collections.ConfigDict, workdir: str,
                mesh: jax.sharding.Mesh) -> dict:
  """{'tokenizer': ...} (CTC) or {'labels': [...]} (classification) of the run's data: what
  turns its head's outputs into text or class names (nothing for the random task)."""
  if config.data.name == 'random':
    return {}
  # Imported here: TFDS and TensorFlow load in seconds, and the random task needs neither.
  from tpa_jax.data import datasets  # pylint: disable=import-outside-toplevel
  data, tokenizer = datasets.open_for_config(ml_collections.ConfigDict(config.to_dict()),
                                             workdir, mesh)
  if tokenizer is not None:
    # The run's decoder goes with it: a lexicon decoder's word counts and settings.
    lexicon = decoding.lexicon_settings(config.decoding,
                                        lambda: data.texts(config.data.train_split))
    return {'tokenizer': tokenizer, **({'lexicon': lexicon} if lexicon else {})}
  return {'labels': data.class_names}


def export_serving(workdir: str, output: str,
                   platforms: Sequence[str] = ('cpu', 'cuda', 'tpu'),
                   mesh: jax.sharding.Mesh | None = None) -> dict:
  """Writes the serving bundle directory `output`, lowered for each of `platforms`; returns its
  manifest."""
  config, model, _, info, step = load_run(workdir, mesh)
  graphdef, state = nnx.split(model)
  weights = adapter_file.flat_arrays(state)

  def serve(weights, features, mask):
    flat = nnx.to_flat_state(state)
    values = [(p, v.replace(weights[adapter_file.state_name(p)])) for p, v in flat]
    logits, out_mask = nnx.merge(graphdef, nnx.from_flat_state(values))(features, mask)
    return logits.astype(jnp.float32), out_mask

  # At least 16 frames: the symbolic output-frame count of the frontend is then >= 1.
  b, t = jax.export.symbolic_shape('b, t', constraints=('t >= 16',))
  input_dim = config.model.frontend.input_dim
  args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()},
          jax.ShapeDtypeStruct((b, t, input_dim), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.bool_))
  exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(*args)
  manifest = {
      'format': BUNDLE_FORMAT, 'step': step, 'base_fingerprint': info['base_fingerprint']['id'],
      'inputs': {'features': ['batch', 'frames', input_dim], 'mask': ['batch', 'frames']},
      'min_frames': 16,
      'outputs': {'logits': ['batch', 'out_frames', 'vocab'], 'mask': ['batch', 'out_frames']},
      'head': config.head.to_dict(), 'features': config.features.to_dict(),
      'platforms': list(exported.platforms),
  }

  return _write_bundle(output, exported, weights, 'weights.safetensors', manifest)


MULTITASK_FORMAT = 'tpa_jax.multitask_serving/1'


def export_multitask(config: ml_collections.ConfigDict, adapters: dict[str, str], output: str, *,
                     capacity: int, platforms: Sequence[str] = ('cpu', 'cuda', 'tpu'),
                     mesh: jax.sharding.Mesh | None = None) -> dict:
  """Writes a multi-task serving bundle: the base of `config.base.path` once
  (`base.safetensors`), and the function (base weights, adapter bank, features, mask, each row's
  utterance and task slot, shared depth) -> per-row logits, serialised with `jax.export` with
  the utterance, row and frame counts symbolic. The bank's layout (`manifest.json`) holds the
  kinds of task of `adapters` (exports of that base) in `capacity` slots; a task is added to a
  loaded bundle from its adapter export alone (serving_loader.MultiTaskBundle.add)."""
  mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
  cfg = multitask.base_config(config)
  model = trainer_lib.load_model(cfg, mesh)
  fingerprint = checkpoint.base_fingerprint(cfg.model, model)
  specs = {name: adapter_file.read_spec(path) for name, path in adapters.items()}
  for name, spec in specs.items():
    if spec.base_fingerprint != fingerprint['id']:
      raise SpecMismatchError(f'{adapters[name]} was trained on base {spec.base_fingerprint}, '
                              f'the bundle\'s base is {fingerprint["id"]}')
  layout = bank_lib.layout_for(specs.values(), cfg.model, capacity=capacity)
  graphdef, state = nnx.split(model.encoder)
  weights = adapter_file.flat_arrays(state)
  flat_state = nnx.to_flat_state(state)
  bank_shapes = serving_loader.flatten(serving_loader.map_with_path(
      lambda leaf, _: jax.ShapeDtypeStruct(leaf[0], jnp.float32), bank_lib.shapes(layout)))
  dtype = jnp.dtype(config.model.dtype)

  def serve(weights, bank, features, mask, row_utterance, task_ids, depth):
    encoder = nnx.merge(graphdef, nnx.from_flat_state(
        [(p, v.replace(weights[adapter_file.state_name(p)])) for p, v in flat_state]))
    tree: dict = {}
    for key, value in bank.items():
      *parents, leaf = key.split('.')
      node = tree
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = value
    x, out_mask = bank_lib.prefix(encoder, features, mask, depth)
    x = jnp.take(x, row_utterance, axis=0)
    out_mask = jnp.take(out_mask, row_utterance, axis=0)
    out = bank_lib.suffix(encoder, layout, tree, x, out_mask, task_ids, depth, dtype=dtype)
    return out, out_mask

  u, r, t = jax.export.symbolic_shape('u, r, t', constraints=('t >= 16',))
  input_dim = config.model.frontend.input_dim
  args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}, bank_shapes,
          jax.ShapeDtypeStruct((u, t, input_dim), jnp.float32),
          jax.ShapeDtypeStruct((u, t), jnp.bool_), jax.ShapeDtypeStruct((r,), jnp.int32),
          jax.ShapeDtypeStruct((r,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
  exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(*args)
  manifest = {
      'format': MULTITASK_FORMAT, 'base_fingerprint': fingerprint['id'],
      'layout': layout.to_json(), 'tasks_shaping_the_layout': sorted(adapters),
      'inputs': {'base': 'base.safetensors', 'bank': 'names as serving_loader.flatten',
                 'features': ['utterances', 'frames', input_dim],
                 'mask': ['utterances', 'frames'], 'row_utterance': ['rows'],
                 'task_ids': ['rows'], 'depth': []},
      'min_frames': 16,
      'outputs': {'ctc': ['rows', 'out_frames', layout.vocab_size],
                  'classification': ['rows', layout.num_classes],
                  'mask': ['rows', 'out_frames']},
      'features': config.features.to_dict(), 'platforms': list(exported.platforms),
  }

  return _write_bundle(output, exported, weights, 'base.safetensors', manifest)


def _write_bundle(output: str, exported, weights: dict[str, np.ndarray], weights_file: str,
                  manifest: dict) -> dict:
  """Writes a serving bundle directory (function, weights, manifest) atomically; returns the
  manifest with each file's size."""
  def write(path):
    os.makedirs(path)
    with open(os.path.join(path, 'function.jaxexport'), 'wb') as f:
      f.write(exported.serialize())
    safetensors_np.save_file(weights, os.path.join(path, weights_file))
    with open(os.path.join(path, 'manifest.json'), 'w') as f:
      json.dump(manifest, f, indent=2)

  adapter_file.write_atomically(output, write, bundle=True)
  sizes = {name: os.path.getsize(os.path.join(output, name)) for name in os.listdir(output)}
  return {**manifest, 'bytes': sizes}


