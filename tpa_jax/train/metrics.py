"""Metrics of a run in its workdir: JSON lines (`metrics.jsonl`) and TensorBoard event files.

Only process 0 writes: with several processes every one computes the same (global) metrics.
TensorBoard's event files are written here directly, without TensorFlow (whose import costs a
training process about 12 s of CPU): TFRecord framing around `Event` protocol buffers, each
scalar a float32 tensor tagged for TensorBoard's scalars plugin, as `tf.summary` writes them.
`tensorboard --logdir <workdir>/tensorboard` shows them.
"""

from __future__ import annotations

import itertools
import json
import numbers
import os
import socket
import struct
import time
from collections.abc import Sequence

import jax


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked_crc(length)) + data +
          struct.pack('<I', _masked_crc(data)))


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protocol-buffer field."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# Field numbers of tensorflow/core/util/event.proto and framework/{summary,tensor}.proto.
_SCALARS_METADATA = _field(9, _field(1, _field(1, b'scalars')))  # Value.metadata.plugin_data


def _scalar(tag: str, value: float) -> bytes:
  """A Summary.Value: the tag, the plugin metadata, a float32 scalar TensorProto (dtype
  DT_FLOAT = 1, an empty shape, one packed float_val)."""
  tensor = _varint(1 << 3) + _varint(1) + _field(2, b'') + _field(5, struct.pack('<f', value))
  return _field(1, tag.encode()) + _SCALARS_METADATA + _field(8, tensor)


def event(step: int, *, summary_values: Sequence[bytes] = (), file_version: str = '') -> bytes:
  """An Event: wall time (double, 1), step (int64, 2), file version (3) or summary (5)."""
  out = _varint(1 << 3 | 1) + struct.pack('<d', time.time())
  if step:
    out += _varint(2 << 3) + _varint(step)
  if file_version:
    out += _field(3, file_version.encode())
  if summary_values:
    out += _field(5, b''.join(_field(1, v) for v in summary_values))
  return out


_FILES = itertools.count()  # (one file per writer, however many a process opens in a second)


class TensorBoardWriter:
  """Scalars as a TensorBoard event file in `directory`."""

  def __init__(self, directory: str):
    os.makedirs(directory, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
            f'{next(_FILES)}.v2')
    self._file = open(os.path.join(directory, name), 'ab')  # pylint: disable=consider-using-with
    self._file.write(tfrecord(event(0, file_version='brain.Event:2')))
    self._file.flush()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    values = [_scalar(tag, value) for tag, value in scalars.items()]
    self._file.write(tfrecord(event(step, summary_values=values)))
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


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
