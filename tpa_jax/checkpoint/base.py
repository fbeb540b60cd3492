"""Base checkpoints: a frozen encoder (or any state) as an orbax checkpoint, replaced safely and
restored straight into sharded targets.

A state is saved as a pure dict of arrays (`nnx.to_pure_dict`). Replacing a base never leaves a
moment without a complete copy: the new one is written to `<path>.saving`, completed by its
metadata file, then the old copy moves to `<path>.old`, the new one into place, and the old copy
is deleted. A crash at any point leaves one complete copy, and the next save or load puts it
back in place (`recover`, with a log line). The metadata lives inside the checkpoint directory
(`tpa_jax.json`, written last, so it marks a complete copy), and a readable copy beside it
(`<path>.json`).
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from tpa_jax.checkpoint.fingerprint import base_state
from tpa_jax.checkpoint.trees import abstract, named_leaves, nest
from tpa_jax.errors import CheckpointError

METADATA_FILE = 'tpa_jax.json'


def _write_json(path: str, value: dict) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


def remove(path: str) -> None:
  """Removes a file or a directory tree, if there is one."""
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def swap_into_place(new: str, path: str) -> None:
  """Moves the complete `new` to `path`. A directory already at `path` moves to `<path>.old`
  until `new` is in place (a file is replaced atomically), so a crash leaves a complete copy."""
  old = path + '.old'
  if os.path.isdir(path):
    remove(old)
    os.replace(path, old)
  os.replace(new, path)
  remove(old)


ORBAX_COMMIT = 'commit_success.txt'  # orbax's marker: every array of the copy is written


def _complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, METADATA_FILE))


def _arrays_complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, ORBAX_COMMIT))


def _recover_files(path: str) -> list[str]:
  """The file operations of `recover` (one process); returns what was done."""
  tmp, old, done = path + '.saving', path + '.old', []
  if not os.path.exists(path):
    if os.path.isdir(tmp) and _complete(tmp):
      os.replace(tmp, path)
      done.append(f'the save was interrupted after the new copy was complete: moved {tmp} into '
                  'place')
    elif os.path.isdir(old):
      os.replace(old, path)
      done.append(f'the save was interrupted before the new copy was complete: put the previous '
                  f'copy {old} back')
    elif os.path.isdir(tmp) and _arrays_complete(tmp):
      # No other copy: a first save interrupted before its metadata, or a replacement
      # interrupted by an older tpa_jax (which deleted the old copy first). Keep the arrays.
      os.replace(tmp, path)
      done.append(f'the save was interrupted after its arrays were written but before its '
                  f'metadata: moved {tmp} into place, without metadata')
  if os.path.isdir(old):
    remove(old)
    done.append(f'removed the replaced copy {old}')
  for partial in sorted(glob.glob(glob.escape(tmp) + '*')):
    remove(partial)
    done.append(f'removed the half-written copy {partial} of an interrupted save')
  inside = os.path.join(path, METADATA_FILE)
  if os.path.isfile(inside):  # the readable copy beside the checkpoint follows the one inside it
    with open(inside) as f:
      meta = json.load(f)
    beside = None
    if os.path.isfile(path + '.json'):
      with open(path + '.json') as f:
        beside = json.load(f)
    if beside != meta:
      _write_json(path + '.json', meta)
  return done


def recover(path: str) -> list[str]:
  """Puts a complete copy of the checkpoint at `path` in place after a save that crashed, and
  removes what that save left; logs and returns what was done (empty when nothing was left)."""
  path = os.path.abspath(path)
  done = _recover_files(path) if jax.process_index() == 0 else []
  if jax.process_count() > 1:  # the others must not read while process 0 moves folders
    multihost_utils.sync_global_devices(f'tpa_jax: recovered {path}')
  for line in done:
    logging.warning('checkpoint %s: %s', path, line)
  return done


def save_state(path: str, state: nnx.State, *, metadata: dict | None = None) -> None:
  """Writes `state` to the orbax checkpoint `path` with JSON `metadata`, replacing an older
  checkpoint there only once the new one is complete."""
  path = os.path.abspath(path)
  recover(path)
  tmp = path + '.saving'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp, nnx.to_pure_dict(state))
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    _write_json(os.path.join(tmp, METADATA_FILE), metadata or {})  # last: the copy is complete
    swap_into_place(tmp, path)
    _write_json(path + '.json', metadata or {})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'tpa_jax: saved {path}')


def read_metadata(path: str) -> dict | None:
  """The metadata saved with the checkpoint at `path`, or None if there is no complete one.
  Reads files only (configs call it before JAX may start): after a crashed save it reads the
  complete copy that the next load or save puts in place, and moves nothing."""
  path = os.path.abspath(path)
  for directory in (path, path + '.saving', path + '.old'):
    if directory != path and os.path.isdir(path):
      break
    if os.path.isfile(os.path.join(directory, METADATA_FILE)):
      with open(os.path.join(directory, METADATA_FILE)) as f:
        return json.load(f)
  if os.path.isdir(path) and os.path.isfile(path + '.json'):  # bases written before: beside
    with open(path + '.json') as f:
      return json.load(f)
  return None


def _check_exists(path: str) -> str:
  path = os.path.abspath(path)
  done = recover(path)
  if not os.path.isdir(path):
    what = ('; ' + '; '.join(done)) if done else ''
    raise CheckpointError(f'no checkpoint at {path}{what}: pass the path of a base (or head) '
                          'written by launch/convert.py, make demo or checkpoint.save_state, e.g. '
                          '--config.base.path=<base>')
  return path


def stored_dtypes(path: str) -> dict:
  """The dtype of every array of the checkpoint at `path`, as a nested dict (its pure-dict
  structure), read from its metadata without reading any array."""
  return _stored_dtypes(_check_exists(path))


def _stored_metadata(path: str):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.metadata(path).item_metadata.tree


def _stored_dtypes(path: str) -> dict:
  return jax.tree.map(lambda m: m.dtype, _stored_metadata(path))


def _check_fits(path: str, named: list, stored: dict) -> None:
  """Names every array the target expects that the checkpoint lacks or holds in another shape
  (a base of another model), before anything is read."""
  missing = [n for n, _ in named if n not in stored]
  shapes = [f"{'/'.join(n)}: stored {tuple(stored[n].shape)}, expected {tuple(t.shape)}"
            for n, t in named if n in stored and tuple(stored[n].shape) != tuple(t.shape)]
  if missing or shapes:
    raise CheckpointError(
        f'the checkpoint at {path} does not fit this model: ' + '; '.join(
            ([f"{len(missing)} arrays missing, e.g. {['/'.join(n) for n in missing[:4]]}"]
             if missing else []) + shapes[:4]) +
        '. Use the model config it was saved with (a converted base records its own).')


def _groups(named: list, budget: int) -> list[list]:
  """Arrays packed largest first into groups of at most `budget` bytes (or one array)."""
  nbytes = lambda x: math.prod(x.shape) * np.dtype(x.dtype).itemsize  # noqa: E731
  groups, size = [], budget
  for item in sorted(named, key=lambda item: -nbytes(item[1])):
    if size + nbytes(item[1]) > budget:
      groups.append([])
      size = 0
    groups[-1].append(item)
    size += nbytes(item[1])
  return groups


def restore_state(path: str, target: nnx.State, *, stored_dtype: bool = False) -> nnx.State:
  """The checkpoint at `path` restored with the structure and shardings of `target` (concrete
  arrays or ShapeDtypeStructs), in `target`'s dtypes or, with `stored_dtype`, in the dtypes the
  checkpoint holds. Each array is read straight into its shards.

  Arrays are read a group at a time (up to the larger of the largest array and 64 MB): reading
  all at once keeps every array's read buffer alive beside its destination, and the process's
  peak then grows by a large part of the base on top of the base itself."""
  path = _check_exists(path)
  named = named_leaves(abstract(nnx.to_pure_dict(target)))
  # (Matched by path names: the checkpoint's metadata names list entries '0', '1', ...)
  stored = dict(named_leaves(_stored_metadata(path)))
  _check_fits(path, named, stored)
  if stored_dtype:
    named = [(n, jax.ShapeDtypeStruct(t.shape, stored[n].dtype, sharding=t.sharding))
             for n, t in named]
  restored = {}
  largest = max((math.prod(t.shape) * np.dtype(t.dtype).itemsize for _, t in named), default=0)
  with ocp.PyTreeCheckpointer() as checkpointer:
    for group in _groups(named, max(largest, 64 * 2 ** 20)):
      item = nest(group)
      args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(
          sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), item)
      restored.update(named_leaves(checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))))
  state = jax.tree.map(lambda x: x, target)  # a copy with the same Variables
  treedef = jax.tree.structure(nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, [restored[n] for n, _ in named]))
  return state


def load_base(path: str, model: nnx.Module) -> None:
  """Loads a base checkpoint into `model`'s encoder (in its dtypes); adapters and head keep
  their values."""
  nnx.update(model.encoder, restore_state(path, base_state(model)))
