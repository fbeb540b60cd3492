"""Metrics of a run in its workdir: JSON lines (`metrics.jsonl`) and TensorBoard event files.

Only process 0 writes: with several processes every one computes the same (global) metrics.
TensorBoard's event files are written with tensorboardX, which needs no TensorFlow (whose import
costs a training process about 12 s of CPU); each scalar is a float32 tensor tagged for
TensorBoard's scalars plugin, as `tf.summary` writes them. `tensorboard --logdir
<workdir>/tensorboard` shows them.
"""

from __future__ import annotations

import itertools
import json
import numbers
import os
import sys

import jax

# tensorboardX imports torch where it is installed (about 3 s of every process's start-up) only
# to accept torch tensors, which nothing here passes: torch is hidden while it loads (a None in
# sys.modules makes `import torch` fail, which tensorboardX allows), unless already imported.
_HIDE_TORCH = 'torch' not in sys.modules
if _HIDE_TORCH:
  sys.modules['torch'] = None
try:
  import tensorboardX  # pylint: disable=wrong-import-position
  from tensorboardX.proto import (  # pylint: disable=wrong-import-position
      summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2)
finally:
  if _HIDE_TORCH:
    del sys.modules['torch']

_FILES = itertools.count()  # (one file per writer, however many a process opens in a second)


# Scalars as `tf.summary.scalar` writes them (TensorBoard's scalars plugin reads either form):
# a float32 tensor with the plugin's metadata, rather than tensorboardX's legacy simple_value.
_SCALARS = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))


def _scalar(tag: str, value: float) -> summary_pb2.Summary.Value:
  return summary_pb2.Summary.Value(tag=tag, metadata=_SCALARS, tensor=tensor_pb2.TensorProto(
      dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
      float_val=[value]))


class TensorBoardWriter:
  """Scalars as a TensorBoard event file in `directory`, flushed after every write (a killed
  run keeps what it logged)."""

  def __init__(self, directory: str):
    os.makedirs(directory, exist_ok=True)
    self._writer = tensorboardX.FileWriter(
        directory, filename_suffix=f'.{os.getpid()}.{next(_FILES)}')
    self._closed = False

  def write(self, step: int, scalars: dict[str, float]) -> None:
    summary = summary_pb2.Summary(value=[_scalar(t, v) for t, v in scalars.items()])
    self._writer.add_summary(summary, step)
    self._writer.flush()

  def close(self) -> None:
    if not self._closed:
      self._writer.close()
      self._closed = True


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
