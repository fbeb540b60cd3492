"""Run checkpoints: the trainable state, optimizer, step, data position and run record of one
training run, saved asynchronously every N steps, restored from the newest committed step."""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.checkpoint.trees import abstract, from_nested, to_nested
from tpa_jax.errors import CheckpointError


def run_info(config: ml_collections.ConfigDict, fingerprint: dict) -> dict:
  """What a run checkpoint records besides arrays: the config, the adapter spec (what resuming
  and evaluating compare), the adapter fields as configured, and the base."""
  return {'config': json.loads(config.to_json_best_effort()), 'base_fingerprint': fingerprint,
          'spec': spec_lib.from_config(config, fingerprint['id']).to_json(),
          'adapter': {k: config.adapter[k] for k in ('placement', 'blocks', 'bottleneck')}}


def saved_spec(info: dict) -> spec_lib.AdapterSpec:
  """The adapter spec recorded in a run record (derived from its config in records written
  before specs were recorded)."""
  if 'spec' in info:
    return spec_lib.AdapterSpec.from_json(info['spec'])
  return spec_lib.from_config(ml_collections.ConfigDict(info['config']),
                              info['base_fingerprint']['id'])


def check_run(info: dict, current: spec_lib.AdapterSpec, directory: str) -> None:
  """Refuses a run checkpoint whose adapter spec differs from this model's (every field named)."""
  spec_lib.check(saved_spec(info), current, what=f'the run checkpoint in {directory}')


def check_workdir(workdir: str) -> str:
  """Creates `workdir` if needed; a clear error if its parent is missing or it is read-only."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise CheckpointError(f'the parent of workdir {workdir} does not exist ({parent}); create '
                          'it first or choose another --workdir')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f'workdir {workdir} is a file, not a directory: choose another '
                          '--workdir (or move the file away)')
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


_ITEMS = ('state', 'data', 'run')


class RunCheckpointer:
  """The checkpoints of one training run: `<directory>/<step>/{state,data,run}`.

  state: the TrainState (step, trainable weights, optimizer state) as named arrays; data: the
  input iterator's position; run: the config, the adapter spec and the base fingerprint.
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
    not fit this run (that error stops the restore: it is not corruption, nothing is moved).
    A step whose record or arrays cannot be read is reported and the previous one is tried;
    newer step folders are then moved aside so the resumed run can save those steps again.
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
    """The run record (config, adapter spec, base fingerprint) saved with `step`."""
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
