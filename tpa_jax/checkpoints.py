"""Orbax checkpoints of model state: the pre-trained base and trained adapters.

A state is saved as a pure dict of arrays (`nnx.to_pure_dict`) and restored directly into the
shardings of a target model's arrays, never materialised whole on one host. Orbax writes to a
temporary folder and renames it on success, so a failed save leaves no half-written checkpoint
in place of a good one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

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
  with ocp.StandardCheckpointer() as checkpointer:
    pure = checkpointer.restore(os.path.abspath(path), abstract(nnx.to_pure_dict(target)))
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


# -- trees as nested dicts of named arrays ---------------------------------------------------------

def _key_name(key) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _named_leaves(tree) -> list[tuple[tuple[str, ...], object]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def to_nested(tree) -> dict:
  """Any pytree (nnx.State, optax states, dataclasses) as nested dicts of its leaves keyed by
  their path names: the structure orbax stores, independent of Python classes."""
  out: dict = {}
  for names, leaf in _named_leaves(tree):
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1] if names else 'value'] = leaf
  return out


def from_nested(target, nested: dict):
  """`target`'s tree structure with its leaves taken from `nested` (as `to_nested` wrote it)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  leaves = []
  for path, _ in paths:
    node = nested
    for name in [_key_name(k) for k in path] or ['value']:
      node = node[name]
    leaves.append(node)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract(tree):
  """ShapeDtypeStructs with the shardings of `tree`'s arrays (an orbax restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


# -- base fingerprints ---------------------------------------------------------------------------

_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


def _checksums(x: jax.Array) -> jax.Array:
  """Two order-sensitive 32-bit sums of the bits of `x` (wrapping), reduced where `x` lives."""
  if x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:
    raise ValueError(f'cannot fingerprint arrays of dtype {x.dtype} (1-, 2- or 4-byte types)')
  position = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
  for axis in range(1, x.ndim):
    position = position * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(
        jnp.uint32, x.shape, axis)
  out = []
  for a, b in (_MIX[:2], _MIX[2:]):
    h = (bits ^ (position * jnp.uint32(a))) * jnp.uint32(b)
    h = h ^ (h >> 15)
    out.append(jnp.sum(h, dtype=jnp.uint32))
  return jnp.stack(out)


def weights_digest(state) -> str:
  """A digest of every array of `state` (names, shapes, dtypes and bits). Each array is reduced
  on the devices that hold it; only two 32-bit numbers per array come to the host."""
  named = _named_leaves(state)
  arrays = [leaf for _, leaf in named]
  shardings = [jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
               if isinstance(x.sharding, jax.sharding.NamedSharding) else None for x in arrays]
  sums = jax.device_get(jax.jit(lambda xs: [_checksums(x) for x in xs],
                                out_shardings=shardings if None not in shardings else None)(
                                    arrays))
  h = hashlib.sha256()
  for (names, x), s in zip(named, sums):
    h.update(f"{'/'.join(names)}|{tuple(x.shape)}|{x.dtype}|{int(s[0])}|{int(s[1])}\n".encode())
  return h.hexdigest()[:16]


# Model fields that do not change the weights (compute dtype, layout of the computation).
_NOT_WEIGHTS = ('dtype', 'scan_layers', 'remat_policy')


def base_fingerprint(model_config, model: nnx.Module) -> dict:
  """Identity of a base: its model config plus a digest of its weights (`id` combines both)."""
  config = {k: v for k, v in model_config.to_dict().items() if k not in _NOT_WEIGHTS}
  digest = weights_digest(base_state(model))
  blob = json.dumps({'config': config, 'weights': digest}, sort_keys=True, default=str)
  return {'id': hashlib.sha256(blob.encode()).hexdigest()[:16], 'weights': digest,
          'config': json.loads(json.dumps(config, default=str))}


# -- adapter (run) checkpoints -----------------------------------------------------------------

class CheckpointError(RuntimeError):
  """A checkpoint cannot be written, or does not fit the run that reads it."""


def check_workdir(workdir: str) -> str:
  """Creates `workdir` if needed; a clear error if its parent is missing or it is read-only."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise CheckpointError(f'the parent of workdir {workdir} does not exist ({parent}); create '
                          'it first or choose another --workdir')
  if not os.path.isdir(workdir):
    if not os.access(parent, os.W_OK):
      raise CheckpointError(f'cannot create workdir {workdir}: {parent} is not writable')
    os.makedirs(workdir, exist_ok=True)
  probe = os.path.join(workdir, f'.write-probe-{os.getpid()}')
  try:  # a real write: permission bits do not tell about read-only mounts (or root)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f'workdir {workdir} is not writable ({e.strerror}): checkpoints and '
                          'metrics go there') from e
  return workdir


ADAPTER_FIELDS = ('placement', 'blocks', 'bottleneck')
_ITEMS = ('state', 'data', 'run')


class RunCheckpointer:
  """The checkpoints of one training run: `<directory>/<step>/{state,data,run}`.

  state: the TrainState (step, trainable weights, optimizer state) as named arrays; data: the
  input iterator's position; run: the config, the adapter fields and the base fingerprint.
  Saves are asynchronous (arrays are copied off the devices before `save` returns), a step
  counts only once orbax's commit marker is written, the newest `keep` steps are kept, and a
  step that fails to restore is reported and the one before it is used.
  """

  COMMIT_MARKER = 'commit_success.txt'

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f'checkpoint.keep must be >= 1, got {keep}')
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    if read_only:  # (exports: nothing in the run's folder changes, it may be training)
      if not os.path.isdir(self.directory):
        raise CheckpointError(f'no checkpoints at {self.directory}')
    else:
      check_workdir(os.path.dirname(self.directory))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def committed_steps(self) -> list[int]:
    """Steps with a commit marker, newest first (a step folder without one is incomplete)."""
    self.manager.reload()
    return sorted((s for s in self.manager.all_steps()
                   if os.path.exists(os.path.join(self.directory, str(s), self.COMMIT_MARKER))),
                  reverse=True)

  def save(self, step: int, state, *, data_state: dict, run_info: dict) -> None:
    """Starts saving `step` (returns once the arrays are off the devices)."""
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(to_nested(state)),
          data=ocp.args.JsonSave(data_state),
          run=ocp.args.JsonSave(run_info)), force=True)
    except OSError as e:
      raise self._save_error(step, e) from e

  def wait(self) -> None:
    """Blocks until every started save is committed (or raises its error)."""
    try:
      self.manager.wait_until_finished()
    except OSError as e:
      raise self._save_error(None, e) from e

  def _save_error(self, step, error: OSError) -> CheckpointError:
    kept = self.committed_steps()
    what = f'step {step}' if step is not None else 'a checkpoint'
    reason = ('the disk is full' if error.errno == errno.ENOSPC else
              'the directory is not writable' if error.errno in (errno.EACCES, errno.EROFS)
              else str(error))
    return CheckpointError(
        f'saving {what} to {self.directory} failed: {reason}. The last committed step '
        f'({kept[0] if kept else "none"}) is kept.')

  def restore_latest(self, state_target, check: Callable[[dict], None] | None = None
                     ) -> tuple[int, object, dict, dict] | None:
    """(step, state, data_state, run_info) of the newest committed step that restores, into
    the structure and shardings of `state_target`; None when there is no committed step.

    `check(run_info)` runs before a step's arrays are read and raises if the checkpoint does
    not fit this run (that error stops the restore: it is not corruption). A step whose record
    or arrays cannot be read is reported and the previous one is tried; newer step folders are
    then moved aside so the resumed run can save those steps again.
    """
    target = abstract(to_nested(state_target))
    steps = self.committed_steps()
    failures = []
    for step in steps:
      try:
        info = self.read_run_info(step)
      except Exception as e:  # pylint: disable=broad-except
        failures.append(self._report_corrupt(step, e))
        continue
      if check is not None:
        check(info)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        failures.append(self._report_corrupt(step, e))
        continue
      if not self.read_only:
        self._discard_after(step)
      return step, from_nested(state_target, restored.state), restored.data, info
    if failures:
      raise CheckpointError(f'no committed step in {self.directory} can be restored: '
                            + '; '.join(failures))
    return None

  def _report_corrupt(self, step: int, error: Exception) -> str:
    first_line = str(error).splitlines()[0] if str(error) else ''
    message = f'step {step}: {type(error).__name__}: {first_line}'
    logging.error('checkpoint step %d in %s is corrupt or incomplete (%s); trying the previous '
                  'committed step', step, self.directory, message)
    return message

  def _discard_after(self, step: int) -> None:
    """Moves step folders newer than `step` (corrupt or uncommitted) out of the way, into
    `<directory>/discarded/`, so the resumed run can save those steps again."""
    if jax.process_index() == 0:
      for s in self.manager.all_steps():
        if s > step and os.path.isdir(os.path.join(self.directory, str(s))):
          target = os.path.join(self.directory, 'discarded', f'{s}-{int(time.time())}')
          os.makedirs(os.path.dirname(target), exist_ok=True)
          os.replace(os.path.join(self.directory, str(s)), target)
          logging.warning('moved step folder %d aside to %s (not used: newer than the resumed '
                          'step %d)', s, target, step)
    if jax.process_count() > 1:  # the others must not list the folders process 0 moves
      multihost_utils.sync_global_devices(f'tpa_jax: discarded steps after {step}')
    self.manager.reload()

  def read_run_info(self, step: int) -> dict:
    """The run record (config, adapter fields, base fingerprint) saved with `step`."""
    return self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore())).run

  def newest_run_info(self) -> dict:
    """The run record of the newest committed step whose record reads."""
    for step in self.committed_steps():
      try:
        return self.read_run_info(step)
      except Exception as e:  # pylint: disable=broad-except
        self._report_corrupt(step, e)
    raise CheckpointError(f'no committed step in {self.directory} has a readable run record')

  def close(self) -> None:
    self.wait()
    self.manager.close()


def check_compatible(run_info: dict, *, fingerprint: dict, adapter: dict) -> None:
  """Refuses a checkpoint trained on another base or with other adapters (named fields)."""
  saved = run_info['base_fingerprint']
  if saved['id'] != fingerprint['id']:
    diff = sorted(k for k in set(saved['config']) | set(fingerprint['config'])
                  if saved['config'].get(k) != fingerprint['config'].get(k))
    raise CheckpointError(
        f"the checkpoint's adapters were trained on base {saved['id']} (weights "
        f"{saved['weights']}), but this run's base is {fingerprint['id']} (weights "
        f"{fingerprint['weights']})" + (f'; differing model fields: {diff}' if diff else ''))
  differing = [f'adapter.{k}: checkpoint {run_info["adapter"].get(k)!r}, config {adapter[k]!r}'
               for k in ADAPTER_FIELDS if run_info['adapter'].get(k) != adapter[k]]
  if differing:
    raise CheckpointError('the config does not match the checkpoint it resumes: '
                          + '; '.join(differing))
