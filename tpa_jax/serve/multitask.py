"""Many tasks over one frozen encoder: the host side of an adapter bank.

`MultiTaskModel` loads the base once (sharded on a mesh by the training rules), holds a bank of
fixed capacity and layout (`tpa_jax.serve.bank`), and adds or removes tasks from adapter exports
by writing slots. `infer` runs utterances, each with one or more tasks: audio is padded to a
length bucket and rows to a batch bucket, so every call runs one of the programs `warmup`
compiled. The frozen prefix (frontend and the blocks below the lowest adapted block of a
batch's tasks) runs once per utterance; each (utterance, task) row continues from there.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tpa_jax import checkpoint, sharding
from tpa_jax.audio.featurizer import featurizer as make_featurizer
from tpa_jax.checkpoint import adapter_file
from tpa_jax.checkpoint.spec import AdapterSpec
from tpa_jax.data import pcm
from tpa_jax.data import tokenizer as tokenizer_lib
from tpa_jax.errors import CheckpointError, SpecMismatchError, UserError
from tpa_jax.eval import decoding
from tpa_jax.serve import bank as bank_lib
from tpa_jax.train import trainer as trainer_lib


@dataclasses.dataclass
class Task:
  """A task in the bank: its slot, spec, what decodes its outputs, and its size."""
  name: str
  slot: int
  spec: AdapterSpec
  path: str
  tokenizer: object | None  # CTC tasks
  labels: list[str] | None  # classification tasks
  trainable_params: int
  bytes: int
  # CTC tasks decoded with the lexicon decoder their export carries (decoding='lexicon').
  decoder: decoding.LexiconDecoder | None = None

  @property
  def lowest_block(self) -> int | None:
    """The lowest block with this task's adapters (None: a head-only task)."""
    return min(self.spec.blocks) if self.spec.blocks else None

  def describe(self) -> dict:
    s = self.spec
    return {'name': self.name, 'slot': self.slot, 'placement': s.placement,
            'blocks': list(s.blocks) if s.blocks else [], 'bottleneck': s.bottleneck,
            'head': s.head_kind, 'head_size': s.head_size,
            'trainable_params': self.trainable_params, 'bytes': self.bytes,
            'base_fingerprint': s.base_fingerprint,
            **({'decoding': 'lexicon' if self.decoder else 'best_path'}
               if s.head_kind == 'ctc' else {})}


# How CTC tasks' outputs become text (MultiTaskModel's decoding_kind).
DECODINGS = ('best_path', 'lexicon')


class UnknownTaskError(UserError):
  """A request names a task that is not served."""


class AudioLengthError(UserError):
  """Audio longer than the longest length bucket."""


class SlotError(UserError):
  """A task cannot take a slot: the bank is full, or the name is taken."""


def read_task(path: str) -> tuple[AdapterSpec, dict[str, np.ndarray], object | None,
                                  list[str] | None, dict | None]:
  """(spec, tensors, tokenizer, class labels, lexicon decoder settings) of an adapter export."""
  spec = adapter_file.read_spec(path)
  tensors, metadata = adapter_file.read_adapters(path)
  tokenizer = labels = None
  lexicon = json.loads(metadata['lexicon']) if 'lexicon' in metadata else None
  if spec.head_kind == 'ctc':
    if 'tokenizer' not in metadata:
      raise CheckpointError(f'{path} carries no tokenizer (exported before serving existed); '
                            're-export it with launch/export.py --kind=adapter')
    tokenizer = tokenizer_lib.deserialize(base64.b64decode(metadata['tokenizer']))
  else:
    labels = json.loads(metadata.get('labels', 'null')) or [
        str(i) for i in range(spec.head_size)]
  return spec, tensors, tokenizer, labels, lexicon


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with no adapters and a one-class head: the frozen encoder alone is loaded."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.adapter.placement = 'none'
  config.train.trainable = 'head'
  config.head.kind, config.head.num_classes = 'classification', 2
  return config


class MultiTaskModel:
  """One frozen encoder, a bank of `capacity` task slots, and the programs that run it."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
               tasks: dict[str, str], capacity: int, reserve: Sequence[str] = (),
               batch_sizes: Sequence[int] = (1, 8), select: str = 'gather',
               decoding_kind: str = 'best_path'):
    """`tasks`: name -> adapter export loaded at start; `reserve`: exports whose kinds the
    bank's layout must also hold (tasks that may be added later). `decoding_kind`: CTC text by
    'best_path', or 'lexicon': with the lexicon decoder an export carries (a run that decoded
    with one), by best path for an export without one."""
    if capacity < max(len(tasks), 1):
      raise UserError(f'--capacity={capacity} is below the {len(tasks)} tasks given')
    if select not in bank_lib.SELECTS:
      raise UserError(f'select={select!r}: accepted values are {bank_lib.SELECTS}')
    if decoding_kind not in DECODINGS:
      raise UserError(f'decoding={decoding_kind!r}: accepted values are {DECODINGS}')
    self.config, self.mesh, self.select = config, mesh, select
    self.decoding_kind = decoding_kind
    self.batch_sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
    cfg = base_config(config)
    model = trainer_lib.load_model(cfg, mesh)
    self.encoder = model.encoder
    self.fingerprint = checkpoint.base_fingerprint(cfg.model, model)['id']
    self.featurizer = make_featurizer(config)
    self.sample_rate_hz = self.featurizer.sample_rate_hz
    self.max_samples = int(round(max(config.data.bucket_seconds) * self.sample_rate_hz))
    self.length_buckets = tuple(int(round(s * self.sample_rate_hz))
                                for s in sorted(config.data.bucket_seconds))
    loaded = {name: read_task(path) for name, path in tasks.items()}
    reserved = [adapter_file.read_spec(path) for path in reserve]
    self.layout = bank_lib.layout_for([t[0] for t in loaded.values()], cfg.model,
                                      capacity=capacity, reserve=reserved)
    if not (self.layout.vocab_size or self.layout.num_classes):
      raise UserError('the bank would hold no kind of task: give tasks (--adapters) or exports '
                      'whose kinds it must hold (--reserve)')
    self.bank = bank_lib.empty(self.layout, lambda axes: sharding.named(mesh, axes))
    self.tasks: dict[str, Task] = {}
    self.lock = threading.Lock()  # slots change between batches, never during one
    self._compile()
    for name, path in tasks.items():
      self._add(name, path, loaded[name])

  # -- programs ---------------------------------------------------------------------------------
  def _compile(self) -> None:
    encoder, layout, featurizer, select = self.encoder, self.layout, self.featurizer, self.select
    dtype = jnp.dtype(self.config.model.dtype)
    lexicon = self.decoding_kind == 'lexicon'

    def prefix(audio, lengths, depth):
      features, mask = featurizer(audio, lengths)
      return bank_lib.prefix(encoder, features, mask, depth)

    def suffix(bank, x, mask, row_utterance, task_ids, depth):
      x, mask = jnp.take(x, row_utterance, axis=0), jnp.take(mask, row_utterance, axis=0)
      out = bank_lib.suffix(encoder, layout, bank, x, mask, task_ids, depth, select=select,
                            dtype=dtype)
      if 'ctc' in out:  # decoded on the host: ship the best path (and, for the lexicon
        logits = out.pop('ctc')  # decoder, the log-probabilities; padded tokens at -1e9)
        out['ctc_ids'] = jnp.argmax(logits, -1).astype(jnp.int32)
        if lexicon:
          out['ctc_log_probs'] = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
      if 'classification' in out:
        out['classification'] = jax.nn.softmax(out['classification'], -1)
      return out, mask

    self._prefix = jax.jit(prefix)
    self._suffix = jax.jit(suffix)
    self._write = jax.jit(bank_lib.write_slot, donate_argnums=0)

  def program_shapes(self) -> list[tuple[int, int, int]]:
    """Every (utterances, rows, audio samples) shape the model runs: the frozen prefix runs on
    the utterances (padded to a batch size), the rest on the (utterance, task) rows (padded to
    a batch size no smaller)."""
    return [(u, r, s) for s in self.length_buckets for r in self.batch_sizes
            for u in self.batch_sizes if u <= r]

  def warmup(self) -> list[tuple[int, int, int]]:
    """Compiles (or loads from the compilation cache) every program; returns their shapes."""
    with jax.set_mesh(self.mesh):
      # Rewriting slot 0 with what it holds compiles the slot writer (host arrays, as `add`),
      # first: the programs below then see the bank as every later call will.
      self.bank = self._write(self.bank, np.int32(0),
                              jax.device_get(bank_lib.read_slot(self.bank, 0)))
      for u, r, s in self.program_shapes():
        audio, lengths = np.zeros((u, s), np.int16), np.full((u,), s, np.int32)
        x, mask = self._prefix(audio, lengths, np.int32(0))
        zeros = np.zeros((r,), np.int32)
        jax.block_until_ready(self._suffix(self.bank, x, mask, zeros, zeros, np.int32(0)))
    logging.info('compiled %d shapes (utterances, rows, samples): %s',
                 len(self.program_shapes()), self.program_shapes())
    return self.program_shapes()

  def compilations(self) -> int:
    """Programs compiled so far (a server checks this stays put after warm-up)."""
    return sum(f._cache_size() for f in (self._prefix, self._suffix, self._write))  # pylint: disable=protected-access

  # -- tasks ------------------------------------------------------------------------------------
  def add(self, name: str, path: str) -> Task:
    """Loads the adapter export at `path` into a free slot as task `name`."""
    return self._add(name, path, read_task(path))

  def _add(self, name: str, path: str, loaded) -> Task:
    spec, tensors, tokenizer, labels, lexicon = loaded
    if not isinstance(name, str) or not name or any(c in name for c in ',=/ \t'):
      raise UserError(f'task name {name!r}: use letters, digits, - or _')
    if spec.base_fingerprint != self.fingerprint:
      raise SpecMismatchError(
          f'{path} was trained on base {spec.base_fingerprint}, this server\'s base is '
          f'{self.fingerprint}: adapters only fit the base they were trained on')
    arrays = bank_lib.slot_arrays(self.layout, spec, tensors, name)
    decoder = (decoding.lexicon_decoder(lexicon, tokenizer)
               if lexicon and self.decoding_kind == 'lexicon' else None)
    with self.lock:
      if name in self.tasks:
        raise SlotError(f'task {name!r} is already served (slot {self.tasks[name].slot}); '
                        'remove it first')
      used = {t.slot for t in self.tasks.values()}
      free = [s for s in range(self.layout.capacity) if s not in used]
      if not free:
        raise SlotError(f'the bank is full: its capacity is {self.layout.capacity} tasks '
                        f'({sorted(self.tasks)}); remove one or restart with a larger '
                        '--capacity')
      with jax.set_mesh(self.mesh):
        self.bank = self._write(self.bank, np.int32(free[0]), arrays)
      task = Task(name, free[0], spec, path, tokenizer, labels,
                  trainable_params=int(sum(v.size for v in tensors.values())),
                  bytes=int(sum(v.nbytes for v in tensors.values())), decoder=decoder)
      self.tasks[name] = task
    return task

  def remove(self, name: str) -> Task:
    """Frees `name`'s slot (its weights are zeroed: nothing of it can reach another task)."""
    with self.lock:
      task = self.task(name)
      with jax.set_mesh(self.mesh):
        self.bank = self._write(self.bank, np.int32(task.slot),
                                bank_lib.free_slot(self.layout))
      del self.tasks[name]
    return task

  def task(self, name: str) -> Task:
    if name not in self.tasks:
      raise UnknownTaskError(f'unknown task {name!r}; the tasks served are {sorted(self.tasks)}')
    return self.tasks[name]

  # -- inference --------------------------------------------------------------------------------
  def check_audio(self, audio: np.ndarray) -> None:
    if audio.ndim != 1 or not len(audio):
      raise UserError('the audio is empty; send at least one 25 ms frame of 16-bit PCM')
    if len(audio) > self.max_samples:
      raise AudioLengthError(f'the audio lasts {len(audio) / self.sample_rate_hz:.2f} s, longer than '
                      f'the {self.max_samples / self.sample_rate_hz:.2f} s accepted')
    if self.featurizer.frames(len(audio)) < 1:
      raise UserError(f'the audio has {len(audio)} samples, fewer than one feature frame '
                      f'({self.featurizer.window} samples)')

  def rows_per_batch(self) -> int:
    return self.batch_sizes[-1]

  def infer(self, utterances: Sequence[np.ndarray], tasks: Sequence[Sequence[str]], *,
            locked: bool = False, suffix_rows: int | None = None) -> list[list[dict]]:
    """For each utterance (int16 samples) and each of its task names, that task's result:
    {'task', 'text'} or {'task', 'label', 'probability'}. All of them in one batch: at most
    `rows_per_batch()` rows (utterance x task) of one length bucket; use `plan_batches` to cut
    a larger set. `locked`: the caller holds `self.lock` (no slot changes meanwhile).
    `suffix_rows`: run the rows after the shared prefix in batches of about this many."""
    if not locked:
      with self.lock:
        return self.infer(utterances, tasks, locked=True, suffix_rows=suffix_rows)
    rows = [(u, self.task(name)) for u, names in enumerate(tasks) for name in names]
    if not rows:
      return [[] for _ in utterances]
    if len(rows) > self.rows_per_batch():
      raise ValueError(f'{len(rows)} rows exceed the largest batch, {self.rows_per_batch()}')
    for audio in utterances:
      self.check_audio(audio)
    bu = next(b for b in self.batch_sizes if b >= len(utterances))
    # Rows run in chunks of a compiled batch size no smaller than the utterances' (one chunk
    # unless `suffix_rows` asks for smaller ones), all from the one prefix.
    want = len(rows) if suffix_rows is None else min(suffix_rows, len(rows))
    chunk = next(b for b in self.batch_sizes if b >= max(want, bu))  # a compiled pair
    s = next(s for s in self.length_buckets if s >= max(len(a) for a in utterances))
    audio = np.zeros((bu, s), np.int16)
    lengths = np.full((bu,), s, np.int32)  # padding utterances: full length, never read
    for i, a in enumerate(utterances):
      audio[i, :len(a)], lengths[i] = a, len(a)
    lows = [t.lowest_block for _, t in rows]
    depth = min([lo for lo in lows if lo is not None], default=self.layout.num_blocks)
    padded = -(-len(rows) // chunk) * chunk
    row_utterance = np.zeros((padded,), np.int32)
    task_ids = np.zeros((padded,), np.int32)
    for i, (u, t) in enumerate(rows):
      row_utterance[i], task_ids[i] = u, t.slot
    with jax.set_mesh(self.mesh):
      x, mask = self._prefix(audio, lengths, np.int32(depth))
      parts = [jax.device_get(self._suffix(self.bank, x, mask, row_utterance[i:i + chunk],
                                           task_ids[i:i + chunk], np.int32(depth)))
               for i in range(0, padded, chunk)]
    out = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    out_mask = np.concatenate([np.asarray(p[1]) for p in parts])
    results: list[list[dict]] = [[] for _ in utterances]
    for i, (u, t) in enumerate(rows):
      if t.spec.head_kind == 'ctc' and t.decoder is not None:
        log_probs = out['ctc_log_probs'][i][out_mask[i]][:, :t.spec.head_size]
        results[u].append({'task': t.name, 'text': t.decoder.decode(log_probs)})
      elif t.spec.head_kind == 'ctc':
        ids = decoding.collapse(out['ctc_ids'][i][out_mask[i]])
        results[u].append({'task': t.name, 'text': t.tokenizer.decode(ids)})
      else:
        probs = out['classification'][i, :t.spec.head_size]
        k = int(np.argmax(probs))
        results[u].append({'task': t.name, 'label': t.labels[k],
                           'probability': float(probs[k])})
    return results

  def plan_batches(self, lengths: Sequence[int], tasks: Sequence[Sequence[str]]
                   ) -> list[list[int]]:
    """Utterance indices cut into batches: each of one length bucket, at most
    `rows_per_batch()` rows (an utterance's tasks stay together)."""
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
      s = next(s for s in self.length_buckets if s >= n)
      by_bucket.setdefault(s, []).append(i)
    batches = []
    for s in sorted(by_bucket):
      batch, rows = [], 0
      for i in by_bucket[s]:
        if batch and rows + len(tasks[i]) > self.rows_per_batch():
          batches.append(batch)
          batch, rows = [], 0
        batch.append(i)
        rows += len(tasks[i])
      if batch:
        batches.append(batch)
    return batches


# -- offline inference (launch/transcribe.py) -----------------------------------------------------
def parse_adapters(text: str) -> dict[str, str]:
  """'NAME=FILE[,NAME=FILE...]' -> {name: file}."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(','))):
    name, sep, path = part.partition('=')
    if not sep or not name or not path:
      raise UserError(f'--adapters: {part!r} is not NAME=FILE (e.g. '
                      'es=runs/es/adapters.safetensors)')
    if name in out:
      raise UserError(f'--adapters names task {name!r} twice')
    out[name] = path
  if not out:
    raise UserError('--adapters names no task; pass NAME=FILE[,NAME=FILE...]')
  return out


def transcribe(model: MultiTaskModel, input_path: str, output_path: str,
               log_every_seconds: float = 10.0) -> dict:
  """Runs every line `WAV_PATH<TAB>TASK[,TASK...]` of `input_path` and writes one JSON line per
  input to `output_path` ({'input', 'line', 'results'} in input order). Inputs that cannot run
  (a missing or bad file, an unknown task, audio too long) are skipped, counted by reason and
  logged. Returns a summary."""
  start = time.time()
  skipped: collections.Counter = collections.Counter()
  items = []  # (line number, path, audio, task names)

  def skip(line_no, reason, detail):
    skipped[reason] += 1
    logging.warning('%s:%d skipped (%s): %s', input_path, line_no, reason, detail)

  with open(input_path) as f:
    lines = f.read().splitlines()
  for line_no, line in enumerate(lines, 1):
    if not line.strip() or line.lstrip().startswith('#'):
      continue
    path, tab, names = line.partition('\t')
    names = [n.strip() for n in names.split(',') if n.strip()]
    if not tab or not names:
      skip(line_no, 'malformed line', f'{line!r} is not WAV_PATH<TAB>TASK[,TASK...]')
      continue
    unknown = [n for n in names if n not in model.tasks]
    if unknown:
      skip(line_no, 'unknown task', f'{unknown}; the tasks served are {sorted(model.tasks)}')
      continue
    try:
      with open(path, 'rb') as wav:
        audio = pcm.decode_wav(wav.read(), model.sample_rate_hz)
      model.check_audio(audio)
    except OSError as e:
      skip(line_no, 'unreadable file', f'{path}: {e.strerror or e}')
      continue
    except pcm.AudioError as e:
      skip(line_no, 'bad audio', f'{path}: {e}')
      continue
    except UserError as e:
      skip(line_no, 'audio length', f'{path}: {e}')
      continue
    if len(names) > model.rows_per_batch():
      skip(line_no, 'too many tasks', f'{len(names)} tasks on one utterance; at most '
           f'{model.rows_per_batch()}')
      continue
    items.append((line_no, path, audio, names))

  results: dict[int, list[dict]] = {}
  batches = model.plan_batches([len(a) for _, _, a, _ in items], [n for *_, n in items])
  last_log, done = time.time(), 0
  for batch in batches:
    try:
      outs = model.infer([items[i][2] for i in batch], [items[i][3] for i in batch])
    except Exception as e:  # pylint: disable=broad-except  (a long run goes on)
      for i in batch:
        skip(items[i][0], 'batch failed', f'{type(e).__name__}: {e}')
      outs = [None] * len(batch)
    for i, out in zip(batch, outs):
      results[i] = out
    done += len(batch)
    if time.time() - last_log > log_every_seconds or done == len(items):
      elapsed = time.time() - start
      eta = elapsed / done * (len(items) - done)
      logging.info('transcribe: %d/%d inputs, elapsed %.0fs, ETA %.0fs', done, len(items),
                   elapsed, eta)
      last_log = time.time()
  tmp = output_path + '.partial'
  with open(tmp, 'w') as f:
    for i, (line_no, path, _, _) in enumerate(items):
      if results[i] is not None:
        f.write(json.dumps({'input': path, 'line': line_no, 'results': results[i]}) + '\n')
  os.replace(tmp, output_path)
  written = sum(r is not None for r in results.values())
  summary = {'inputs': written + sum(skipped.values()), 'written': written,
             'skipped': sum(skipped.values()), 'skipped_by_reason': dict(skipped),
             'batches': len(batches), 'seconds': round(time.time() - start, 1)}
  return summary
