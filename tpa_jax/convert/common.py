"""What every converter shares: a Hugging Face model directory, a plan of rules that fills each
target parameter from named source tensors, the check of that plan against the files (before any
array is read), and the base checkpoint it writes.

A converted base is a directory: `encoder/` (an orbax checkpoint of `checkpoint.base_state`, as
`config.base.path` expects) and `encoder.json` (the model and features configs it needs, where it
came from, and which source tensors were deliberately left out).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import safe_open

from tpa_jax import checkpoint, sharding
from tpa_jax import config as config_lib
from tpa_jax.errors import UserError
from tpa_jax.nn import build

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
PREPROCESSOR_FILE = 'preprocessor_config.json'
ENCODER = 'encoder'  # the checkpoint folder inside a converted base


class ConversionError(UserError, ValueError):
  """A source that cannot be converted as it is; the message names every offending item."""


def identity(x: np.ndarray) -> np.ndarray:
  """The transform of a tensor whose layout is already the target's."""
  return x


@dataclasses.dataclass(frozen=True)
class Rule:
  """Fills the target parameter at `target` (a path in the base state) from `sources`: one
  tensor, or one per block stacked on a leading `layers` axis (`stacked`). Each source must
  have `shape`; `transform` turns one into the target layout."""
  target: tuple[str, ...]
  sources: tuple[str, ...]
  shape: tuple[int, ...]
  transform: Callable[[np.ndarray], np.ndarray] = identity
  stacked: bool = False


def per_layer(target: tuple[str, ...], template: str, num_layers: int, shape: tuple[int, ...],
              transform: Callable[[np.ndarray], np.ndarray] = identity) -> Rule:
  """A stacked rule whose sources are `template.format(i)` for each block i."""
  return Rule(target, tuple(template.format(i) for i in range(num_layers)), tuple(shape),
              transform, stacked=True)


class HFDirectory:
  """A Hugging Face model directory: `config.json` and safetensors weights (one
  `model.safetensors`, or shards listed by `model.safetensors.index.json`)."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    if not os.path.isdir(self.directory):
      raise ConversionError(f'--input={directory}: no such directory')
    present = sorted(os.listdir(self.directory))
    missing = [f for f in (CONFIG_FILE,) if f not in present]
    if WEIGHTS_FILE not in present and INDEX_FILE not in present:
      missing.append(f'{WEIGHTS_FILE} (or {INDEX_FILE} with its shards)')
    if missing:
      raise ConversionError(
          f'--input={directory} is not a Hugging Face model directory: missing {missing}; it '
          f'holds {present[:20]}{" ..." if len(present) > 20 else ""}')
    self.config = self._json(CONFIG_FILE)
    self.preprocessor = (self._json(PREPROCESSOR_FILE) if PREPROCESSOR_FILE in present
                         else None)
    if WEIGHTS_FILE in present:
      files = [WEIGHTS_FILE]
    else:
      files = sorted(set(self._json(INDEX_FILE).get('weight_map', {}).values()))
      absent = [f for f in files if f not in present]
      if absent or not files:
        raise ConversionError(f'{INDEX_FILE} in {directory} names shards that are not there: '
                              f'{absent or "(none listed)"}')
    self.file_of: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
      path = os.path.join(self.directory, name)
      try:
        with safe_open(path, 'np') as f:
          for key in f.keys():
            self.file_of[key] = path
            self.shapes[key] = tuple(f.get_slice(key).get_shape())
      except Exception as e:  # pylint: disable=broad-except  (safetensors' own error types)
        raise ConversionError(f'{path} is not a readable safetensors file: {e}') from e

  def _json(self, name: str) -> dict:
    path = os.path.join(self.directory, name)
    try:
      with open(path) as f:
        return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f'{path} is not valid JSON: {e}') from e

  def load(self, name: str) -> np.ndarray:
    """The tensor `name` as float32 (bf16 and f16 sources are widened)."""
    with safe_open(self.file_of[name], 'np') as f:
      return np.asarray(f.get_tensor(name), np.float32)


def ignored_tensors(names, ignored: Mapping[str, str]) -> dict[str, str]:
  """The names that a pattern of `ignored` (regular expression -> why it is left out) matches
  in full, each with its reason."""
  out = {}
  for name in sorted(names):
    for pattern, reason in ignored.items():
      if re.fullmatch(pattern, name):
        out[name] = reason
        break
  return out


def check_plan(rules: list[Rule], shapes: Mapping[str, tuple[int, ...]],
               ignored: Mapping[str, str], what: str) -> None:
  """Raises a ConversionError naming every missing tensor, every tensor of an unexpected shape
  and every source tensor that no rule consumes and no pattern of `ignored` matches."""
  expected: dict[str, tuple[int, ...]] = {}
  for rule in rules:
    for name in rule.sources:
      expected[name] = rule.shape
  missing = [f'  {n}: expected shape {s}' for n, s in expected.items() if n not in shapes]
  wrong = [f'  {n}: expected shape {s}, found {shapes[n]}' for n, s in expected.items()
           if n in shapes and tuple(shapes[n]) != tuple(s)]
  skipped = ignored_tensors(shapes, ignored)
  unmapped = [f'  {n}: found shape {shapes[n]}' for n in sorted(shapes)
              if n not in expected and n not in skipped]
  problems = []
  for title, lines in (('missing tensors', missing), ('tensors of unexpected shape', wrong),
                       ('unmapped tensors (neither converted nor known to be ignorable)',
                        unmapped)):
    if lines:
      problems.append(f'{len(lines)} {title}:\n' + '\n'.join(lines))
  if problems:
    raise ConversionError(f'cannot convert {what}; nothing was written.\n' + '\n'.join(problems))


def abstract_base(config: ml_collections.ConfigDict) -> nnx.State:
  """The base state of the model `config` describes, as shapes only (nothing allocated)."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, abstract = sharding.abstract_model(lambda: build.build_model(config, seed=0), mesh)
  return checkpoint.base_state(nnx.merge(graphdef, abstract))


def assemble(rules: list[Rule], source: HFDirectory, target: nnx.State, what: str) -> nnx.State:
  """`target` (an abstract base state) with every parameter filled by its rule. Every target
  must have exactly one rule, and each rule's output the target's shape."""
  flat = {path: v for path, v in nnx.to_flat_state(target)}
  by_target = {rule.target: rule for rule in rules}
  unfilled = sorted('/'.join(map(str, p)) for p in flat if p not in by_target)
  unknown = sorted('/'.join(r.target) for r in rules if r.target not in flat)
  if unfilled or unknown:
    raise ConversionError(f'cannot convert {what}: no rule fills {unfilled}; rules name '
                          f'parameters the model lacks: {unknown}')
  values = {}
  for path, variable in flat.items():
    rule = by_target[path]
    arrays = [rule.transform(source.load(name)) for name in rule.sources]
    value = np.stack(arrays) if rule.stacked else arrays[0]
    want = variable.get_value()
    if value.shape != want.shape:
      raise ConversionError(f'cannot convert {what}: {"/".join(path)} needs shape {want.shape}, '
                            f'its rule makes {value.shape} from {rule.sources[0]}')
    values[path] = jnp.asarray(value, want.dtype)
  state = jax.tree.map(lambda x: x, target)
  for path, variable in nnx.to_flat_state(state):
    variable.set_value(values[path])
  return state


def write_base(output_dir: str, state: nnx.State, config: ml_collections.ConfigDict,
               info: dict) -> str:
  """Writes `state` to `output_dir/encoder` with the model and features configs (and `info`)
  in `output_dir/encoder.json`; returns the checkpoint path."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(os.path.abspath(output_dir), ENCODER)
  metadata = {'model': config.model.to_dict(), 'features': config.features.to_dict(), **info}
  checkpoint.save_state(path, state, metadata=json.loads(json.dumps(metadata, default=str)))
  return path


def convert_directory(source: HFDirectory, output_dir: str, *, kind: str,
                      config: ml_collections.ConfigDict, plan: list[Rule],
                      ignored: Mapping[str, str], prefix: str, what: str) -> dict:
  """Checks `plan` against `source`, fills the base that `config` describes and writes it to
  `output_dir`; returns a summary. Tensor names lose `prefix` (the encoder's name inside a
  checkpoint with a head) first. Nothing is written unless every check passes."""
  local = {(n[len(prefix):] if prefix and n.startswith(prefix) else n): n for n in source.shapes}
  shapes = {name: source.shapes[raw] for name, raw in local.items()}
  check_plan(plan, shapes, ignored, what)
  renamed = [dataclasses.replace(r, sources=tuple(local[s] for s in r.sources)) for r in plan]
  state = assemble(renamed, source, abstract_base(config), what)
  skipped = ignored_tensors(shapes, ignored)
  path = write_base(output_dir, state, config, {
      'source': {'kind': kind, 'input': source.directory, 'tensors': len(shapes),
                 'hf_config': source.config},
      'ignored': skipped})
  params = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state))
  return {'base': path, 'params': params, 'converted_tensors': len(shapes) - len(skipped),
          'ignored': skipped, 'model': config.model.to_dict(),
          'features': config.features.to_dict()}


# -- reading a base's configs ------------------------------------------------------------------

def base_path(path: str) -> str:
  """The checkpoint folder of a base: `path/encoder` for a converted base directory, else
  `path` itself."""
  inner = os.path.join(path, ENCODER)
  return inner if os.path.isdir(inner) else path


def _update(node: ml_collections.ConfigDict, values: Mapping, prefix: str) -> None:
  for key, value in values.items():
    if key not in node:
      raise ConversionError(f'the base sets {prefix}{key}, which this tpa_jax does not know '
                            f'(known: {sorted(node.keys())})')
    if isinstance(node[key], ml_collections.ConfigDict):
      _update(node[key], value, f'{prefix}{key}.')
    else:
      node[key] = tuple(value) if isinstance(value, list) else value


def apply_base_config(config: ml_collections.ConfigDict, path: str) -> bool:
  """Sets `config.model` and `config.features` from the metadata saved with the base at `path`
  (a converted base directory or a checkpoint folder). False when the base has no such
  metadata (as the demo's own bases): then the config must describe the model itself."""
  meta = checkpoint.read_metadata(base_path(path))
  if meta is None or 'model' not in meta:
    return False
  _update(config.model, meta['model'], 'model.')
  _update(config.features, meta.get('features', {}), 'features.')
  return True


def default_config() -> ml_collections.ConfigDict:
  """The base config for a converted encoder: no adapters (the base never holds any)."""
  config = config_lib.base_config()
  config.adapter.placement = 'none'
  return config
