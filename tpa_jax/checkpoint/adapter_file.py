"""The adapter file: a task's trained arrays (adapters and head) as flat named safetensors, with
the adapter spec (`tpa_jax.checkpoint.spec`: placement, resolved blocks, bottleneck, residual
weight, activation, norm, init, head, base fingerprint), the model config and what decodes the
head (tokenizer or class labels, lexicon settings). `attach_adapters` puts them onto a model
whose config and base have the same spec, and refuses any other. Written by
`launch/export.py --kind=adapter`; read by evaluation, the adapter bank and serving.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_np
from safetensors import safe_open

from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.checkpoint.base import remove, swap_into_place
from tpa_jax.errors import CheckpointError, SpecMismatchError
from tpa_jax.nn.params import trainable_filter

ADAPTER_FORMAT = 'tpa_jax.adapters/1'


def state_name(path) -> str:
  return '/'.join(str(k) for k in path)


def flat_arrays(state: nnx.State) -> dict[str, np.ndarray]:
  """'encoder/blocks/0/...': host array, for every variable of `state`."""
  return {state_name(path): np.asarray(jax.device_get(v[...]))
          for path, v in nnx.to_flat_state(state)}


def write_adapters(output: str, tensors: dict[str, np.ndarray], config, spec: spec_lib.AdapterSpec,
                   fingerprint: dict, step: int, *, tokenizer=None,
                   labels: Sequence[str] | None = None, lexicon: dict | None = None) -> dict:
  """Writes an adapter export: `tensors` (adapter and head arrays by state path) with `spec`,
  the base's `fingerprint`, and the tokenizer or class labels that decode the head (and a CTC
  run's lexicon decoder, `decoding.lexicon_settings`, when it decodes with one)."""
  metadata = {
      'format': ADAPTER_FORMAT, 'step': str(step), 'spec': json.dumps(spec.to_json()),
      'placement': config.adapter.placement, 'blocks': str(config.adapter.blocks),
      'bottleneck': str(config.adapter.bottleneck), 'trainable': config.train.trainable,
      'base_fingerprint': fingerprint['id'], 'base_weights_digest': fingerprint['weights'],
      'adapter': json.dumps(config.adapter.to_dict()), 'head': json.dumps(config.head.to_dict()),
      'model': json.dumps(fingerprint['config']),
  }
  if tokenizer is not None:
    metadata['tokenizer'] = base64.b64encode(tokenizer.serialize()).decode('ascii')
  if labels is not None:
    metadata['labels'] = json.dumps(list(labels))
  if lexicon is not None:
    metadata['lexicon'] = json.dumps(lexicon)
  write_atomically(output, lambda path: safetensors_np.save_file(tensors, path, metadata))
  return {**{k: v for k, v in metadata.items() if k not in ('tokenizer', 'lexicon')},
          'num_tensors': len(tensors), 'bytes': os.path.getsize(output)}


def read_metadata(path: str) -> dict[str, str]:
  """The metadata of an adapter export, without reading its arrays."""
  if not os.path.isfile(path):
    raise CheckpointError(f'no adapter export at {path}: pass a file written by '
                          'launch/export.py --kind=adapter')
  try:
    with safe_open(path, framework='numpy') as f:
      metadata = f.metadata() or {}
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    raise CheckpointError(f'{path} is not a safetensors file ({e})') from e
  if metadata.get('format') != ADAPTER_FORMAT:
    raise CheckpointError(f'{path} is not a tpa_jax adapter export (format '
                          f'{metadata.get("format")!r}, expected {ADAPTER_FORMAT!r})')
  return metadata


def read_spec(path: str) -> spec_lib.AdapterSpec:
  """The adapter spec recorded in an adapter export (derived from its adapter, head and model
  fields for exports written before specs were recorded)."""
  metadata = read_metadata(path)
  try:
    if 'spec' in metadata:
      return spec_lib.AdapterSpec.from_json(json.loads(metadata['spec']))
    config = ml_collections.ConfigDict({
        'adapter': json.loads(metadata['adapter']), 'head': json.loads(metadata['head']),
        'model': {'num_blocks': json.loads(metadata['model'])['num_blocks']},
        'train': {'trainable': metadata['trainable']}})
    return spec_lib.from_config(config, metadata['base_fingerprint'])
  except (ValueError, KeyError, TypeError) as e:  # (json.JSONDecodeError is a ValueError)
    raise CheckpointError(f'{path} has unreadable adapter metadata ({type(e).__name__}: {e}); '
                          're-export it with launch/export.py') from e


def read_adapters(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of an adapter export."""
  metadata = read_metadata(path)
  with safe_open(path, framework='numpy') as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return tensors, metadata


def attach_adapters(path: str, model: nnx.Module, spec: spec_lib.AdapterSpec) -> None:
  """Sets `model`'s adapter and head arrays from an adapter export. Refuses, before reading any
  array, an export whose spec differs from `spec` (this config's, over this base), and after,
  an export that leaves an adapter or head variable of the model unset."""
  spec_lib.check(read_spec(path), spec, what=path, saved_as='export')
  tensors, _ = read_adapters(path)
  by_name = {state_name(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
  trained = {state_name(p) for p, _ in nnx.to_flat_state(
      nnx.state(model, trainable_filter(spec.trainable)))}
  extra = sorted(set(tensors) - set(by_name))
  unset = sorted(trained - set(tensors))
  if extra or unset:
    raise SpecMismatchError(
        f'{path} does not fit this model: ' +
        '; '.join(([f'arrays the model lacks: {extra[:5]}'] if extra else []) +
                  ([f'adapter or head variables it leaves unset: {unset[:5]}'] if unset else []))
        + '. Use the config the adapters were trained with.')
  for name, array in tensors.items():
    var = by_name[name]
    if tuple(var[...].shape) != array.shape:
      raise SpecMismatchError(f'{path}: {name} has shape {array.shape} in the export, '
                              f'{tuple(var[...].shape)} in the model')
  for name, array in tensors.items():
    var = by_name[name]
    var.set_value(jax.device_put(jnp.asarray(array, var[...].dtype), var[...].sharding))


def write_atomically(output: str, write, *, bundle: bool = False) -> None:
  """`write(tmp)`, then the result replaces `output` only once it is complete: a failed export
  never leaves half a file, nor loses the previous one. Only an earlier export of the same
  kind is replaced (a file, or a serving bundle directory), never another directory."""
  output = os.path.abspath(output)
  if not os.path.isdir(os.path.dirname(output)):
    raise CheckpointError(f'the folder of --output={output} does not exist')
  if bundle and os.path.exists(output) and not os.path.isfile(
      os.path.join(output, 'manifest.json')):
    raise CheckpointError(f'--output={output} exists and is not a serving bundle; pass a new '
                          'path (only an earlier bundle is replaced)')
  if not bundle and os.path.isdir(output):
    raise CheckpointError(f'--output={output} is a directory; pass a file path such as '
                          f'{os.path.join(output, "adapters.safetensors")}')
  tmp = output + '.partial'
  remove(tmp)
  write(tmp)
  swap_into_place(tmp, output)
