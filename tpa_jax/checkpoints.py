"""Orbax checkpoints of model state: the pre-trained base and trained adapters.

A state is saved as a pure dict of arrays (`nnx.to_pure_dict`) and restored directly into the
shardings of a target model's arrays, never materialised whole on one host. Orbax writes to a
temporary folder and renames it on success, so a failed save leaves no half-written checkpoint
in place of a good one.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tpa_jax.nn.params import AdapterParam


def save_state(path: str, state: nnx.State, *, metadata: dict | None = None) -> None:
  """Writes `state` to the orbax checkpoint `path` (replacing an older one only on success),
  with optional JSON `metadata` beside it (`path`.json)."""
  path = os.path.abspath(path)
  tmp = path + '.saving'
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp, nnx.to_pure_dict(state))
    checkpointer.wait_until_finished()
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  if metadata is not None:
    with open(path + '.json.tmp', 'w') as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
    os.replace(path + '.json.tmp', path + '.json')


def read_metadata(path: str) -> dict | None:
  """The metadata saved with the checkpoint at `path`, or None if there is no complete one."""
  path = os.path.abspath(path)
  if not (os.path.isdir(path) and os.path.exists(path + '.json')):
    return None
  with open(path + '.json') as f:
    return json.load(f)


def restore_state(path: str, target: nnx.State) -> nnx.State:
  """The checkpoint at `path` restored with the structure, dtypes and shardings of `target`."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      nnx.to_pure_dict(target))
  with ocp.StandardCheckpointer() as checkpointer:
    pure = checkpointer.restore(os.path.abspath(path), abstract)
  state = jax.tree.map(lambda x: x, target)  # a copy with the same Variables
  nnx.replace_by_pure_dict(state, pure)
  return state


def base_state(model: nnx.Module) -> nnx.State:
  """What a base checkpoint holds: every encoder variable except adapters (the layout does not
  depend on which blocks carry adapters)."""
  return nnx.state(model.encoder, nnx.Not(AdapterParam))


def load_base(path: str, model: nnx.Module) -> None:
  """Loads a base checkpoint into `model`'s encoder; adapters and head keep their values."""
  nnx.update(model.encoder, restore_state(path, base_state(model)))
