"""Exports of a trained run: adapters as safetensors, and a self-contained serving bundle.

Adapter export: the trained arrays (adapters and head) as flat named tensors, with the metadata
that re-attaching them needs (placement, blocks, bottleneck, head, base fingerprint, model
config). `attach_adapters` puts them onto a model whose base has the same fingerprint.

Serving bundle (a directory): `function.jaxexport`, the inference function features -> logits
serialised with `jax.export` (batch and frame counts symbolic), `weights.safetensors` with every
array it needs, and `manifest.json`. `tpa_jax/serving_loader.py` loads and runs it with jax,
numpy and safetensors alone.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_np

from tpa_jax import checkpoints, sharding, training

ADAPTER_FORMAT = 'tpa_jax.adapters/1'
BUNDLE_FORMAT = 'tpa_jax.serving/1'


def _name(path) -> str:
  return '/'.join(str(k) for k in path)


def flat_arrays(state: nnx.State) -> dict[str, np.ndarray]:
  """'encoder/blocks/0/...': host array, for every variable of `state`."""
  return {_name(path): np.asarray(jax.device_get(v[...]))
          for path, v in nnx.to_flat_state(state)}


def load_run(workdir: str):
  """(config, model, run info, step) of the newest committed checkpoint of the run in
  `workdir`: the base rebuilt as the run built it, with the trained state restored."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise checkpoints.CheckpointError(f'no checkpoints in {workdir} (looked for {directory})')
  ckpt = checkpoints.RunCheckpointer(directory, async_save=False, read_only=True)
  steps = ckpt.committed_steps()
  if not steps:
    raise checkpoints.CheckpointError(f'no committed checkpoint in {directory}')
  info = ckpt.newest_run_info()
  config = ml_collections.ConfigDict(info['config'])
  trainer, fingerprint = training.make_run_trainer(config, sharding.make_mesh(**config.mesh))
  step, trainer.state, _, info = ckpt.restore_latest(
      trainer.state, check=lambda i: checkpoints.check_compatible(
          i, fingerprint=fingerprint, adapter=info['adapter']))
  ckpt.close()
  return config, trainer.model(), trainer.state.trainable, info, step


def export_adapters(workdir: str, output: str) -> dict:
  """Writes the run's trained arrays to the safetensors file `output`; returns its metadata."""
  config, _, trainable, info, step = load_run(workdir)
  tensors = flat_arrays(trainable)
  fingerprint = info['base_fingerprint']
  metadata = {
      'format': ADAPTER_FORMAT, 'step': str(step),
      'placement': config.adapter.placement, 'blocks': str(config.adapter.blocks),
      'bottleneck': str(config.adapter.bottleneck), 'trainable': config.train.trainable,
      'base_fingerprint': fingerprint['id'], 'base_weights_digest': fingerprint['weights'],
      'adapter': json.dumps(config.adapter.to_dict()), 'head': json.dumps(config.head.to_dict()),
      'model': json.dumps(fingerprint['config']),
  }
  _write_atomically(output, lambda path: safetensors_np.save_file(tensors, path, metadata))
  return {**metadata, 'num_tensors': len(tensors), 'bytes': os.path.getsize(output)}


def read_adapters(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of an adapter export."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework='numpy') as f:
    metadata = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if metadata.get('format') != ADAPTER_FORMAT:
    raise ValueError(f'{path} is not a tpa_jax adapter export (format '
                     f'{metadata.get("format")!r}, expected {ADAPTER_FORMAT!r})')
  return tensors, metadata


def attach_adapters(path: str, model: nnx.Module, base_fingerprint: dict) -> None:
  """Sets `model`'s adapter and head arrays from an adapter export, refusing a base whose
  fingerprint differs from the one the adapters were trained on."""
  tensors, metadata = read_adapters(path)
  if metadata['base_fingerprint'] != base_fingerprint['id']:
    raise checkpoints.CheckpointError(
        f"{path} was trained on base {metadata['base_fingerprint']} (weights "
        f"{metadata['base_weights_digest']}), but this base is {base_fingerprint['id']} "
        f"(weights {base_fingerprint['weights']})")
  flat = nnx.to_flat_state(nnx.state(model))
  by_name = {_name(p): v for p, v in flat}
  missing = sorted(set(tensors) - set(by_name))
  if missing:
    raise ValueError(f'{path} has arrays this model lacks (placement, blocks or bottleneck '
                     f'differ?): {missing[:5]}')
  for name, array in tensors.items():
    var = by_name[name]
    if tuple(var[...].shape) != array.shape:
      raise ValueError(f'{name}: the export has shape {array.shape}, the model '
                       f'{tuple(var[...].shape)}')
    var.set_value(jax.device_put(jnp.asarray(array, var[...].dtype), var[...].sharding))


def export_serving(workdir: str, output: str,
                   platforms: Sequence[str] = ('cpu', 'cuda', 'tpu')) -> dict:
  """Writes the serving bundle directory `output`, lowered for each of `platforms`; returns its
  manifest."""
  config, model, _, info, step = load_run(workdir)
  graphdef, state = nnx.split(model)
  weights = flat_arrays(state)

  def serve(weights, features, mask):
    flat = nnx.to_flat_state(state)
    values = [(p, v.replace(weights[_name(p)])) for p, v in flat]
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

  def write(path):
    os.makedirs(path)
    with open(os.path.join(path, 'function.jaxexport'), 'wb') as f:
      f.write(exported.serialize())
    safetensors_np.save_file(weights, os.path.join(path, 'weights.safetensors'))
    with open(os.path.join(path, 'manifest.json'), 'w') as f:
      json.dump(manifest, f, indent=2)

  _write_atomically(output, write)
  sizes = {name: os.path.getsize(os.path.join(output, name)) for name in os.listdir(output)}
  return {**manifest, 'bytes': sizes}


def _write_atomically(output: str, write) -> None:
  """`write(tmp)` then rename onto `output`: a failed export never leaves half a file."""
  output = os.path.abspath(output)
  if not os.path.isdir(os.path.dirname(output)):
    raise FileNotFoundError(f'the folder of --output={output} does not exist')
  tmp = output + '.partial'
  _remove(tmp)
  write(tmp)
  _remove(output)
  os.replace(tmp, output)


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)
