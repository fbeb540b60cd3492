"""Metrics of a run in its workdir: JSON lines (`metrics.jsonl`) and TensorBoard event files.

Only process 0 writes: with several processes every one computes the same (global) metrics.
TensorBoard scalars are written with `tf.summary.write` (TensorFlow core, no `tensorboard`
package needed to write them); `tensorboard --logdir <workdir>/tensorboard` shows them.
"""

from __future__ import annotations

import json
import numbers
import os
import threading

import jax


class TensorBoardWriter:
  """Scalars as TensorBoard event files in `directory`.

  TensorFlow takes seconds to import: it is imported in a background thread from the start,
  while the first steps compile, and the first `write` waits for it.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._tf = self._writer = self._metadata = None
    self._error: BaseException | None = None
    self._ready = threading.Thread(target=self._open, daemon=True, name='tensorboard-import')
    self._ready.start()

  def _open(self) -> None:
    try:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._writer = tf.summary.create_file_writer(self.directory)
      # What tensorboard's own scalar summary writes: a float32 scalar tagged for its plugin.
      self._metadata = tf.compat.v1.SummaryMetadata(
          plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name='scalars'))
      self._tf = tf
    except BaseException as e:  # pylint: disable=broad-except  (raised again by `write`)
      self._error = e

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._ready.join()
    if self._error is not None:
      raise RuntimeError(f'cannot write TensorBoard events to {self.directory}') from self._error
    tf = self._tf
    with self._writer.as_default(step=step):
      for tag, value in scalars.items():
        tf.summary.write(tag, tf.constant(value, tf.float32), metadata=self._metadata)
    self._writer.flush()

  def close(self) -> None:
    self._ready.join()
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class MetricsWriter:
  """Appends one JSON object per logged step to `workdir/<name>` and, with `tensorboard`, the
  numeric values as scalars `<stage>/<name>` under `workdir/tensorboard`. A no-op outside
  process 0."""

  def __init__(self, workdir: str, name: str = 'metrics.jsonl', *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, name)
    self.tensorboard = (TensorBoardWriter(os.path.join(workdir, 'tensorboard'))
                        if tensorboard and self.enabled else None)
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    if self.tensorboard is not None:
      stage = metrics.get('stage', 'train')
      self.tensorboard.write(step, {f'{stage}/{k}': float(v) for k, v in metrics.items()
                                    if isinstance(v, numbers.Real) and not isinstance(v, bool)})

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after `step`: a resumed run logs them again (and writes them to a
    new TensorBoard event file)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    lines = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line)['step'] <= step:
            lines.append(line)
        except (json.JSONDecodeError, KeyError):  # a line torn by a killed run
          continue
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(lines)
    os.replace(self.path + '.tmp', self.path)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


def write_json(path: str, value: dict) -> None:
  """Writes `value` to `path` from process 0 (atomically: a reader never sees half a file)."""
  if jax.process_index() != 0:
    return
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)
