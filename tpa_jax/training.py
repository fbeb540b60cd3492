"""The training loop: mesh, model, trainer, data, steps with progress, metrics in the workdir.

`train(config, workdir)` runs one job from a config: on the synthetic random task
(`data.name='random'`) or on a TFDS speech dataset (audio featurized on device). `fit` is the
loop itself, shared with the demo.

With several processes (`tpa_jax.distributed`) every process runs this same code: each reads
its own rows of every global batch, all take part in every step and checkpoint save, and
process 0 alone writes the metrics and results files.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import signal
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tpa_jax import checkpoints, decoding, evaluation, features, models, optim, partition, sharding, synthetic
from tpa_jax import train_step
from tpa_jax.metrics import MetricsWriter


class _LibraryInfoFilter(std_logging.Filter):
  """Drops INFO records of orbax and TFDS (one line per file written), keeps their warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorflow_datasets'))


def quiet_library_logs() -> None:
  """Keeps the log readable: our progress lines, the libraries' warnings."""
  for handler in (logging.get_absl_handler(), *std_logging.getLogger().handlers):
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
      handler.addFilter(_LibraryInfoFilter())


class RandomBatches:
  """The synthetic learnable task of `tpa_jax.synthetic`, shaped by `config.data`: global batch
  `s` is a function of (seed, s) alone, so the position (`get_state`) is the next batch's index.
  Process p of P yields rows [p·B/P, (p+1)·B/P) of each global batch of B rows."""

  def __init__(self, config: ml_collections.ConfigDict, seed: int, *,
               process_index: int | None = None, process_count: int | None = None):
    self.config, self.seed, self.next_index = config, seed, 0
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if config.train.batch_size % self.process_count:
      raise ValueError(f'train.batch_size={config.train.batch_size} does not divide over '
                       f'{self.process_count} processes; use a multiple of {self.process_count}')

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = random_batch(self.config, np.random.default_rng([self.seed, self.next_index]),
                         self.config.train.batch_size)
    self.next_index += 1
    per = self.config.train.batch_size // self.process_count
    rows = slice(self.process_index * per, (self.process_index + 1) * per)
    return {k: v[rows] for k, v in batch.items()}

  def get_state(self) -> dict:
    return {'next_index': self.next_index}

  def set_state(self, state: dict) -> None:
    self.next_index = int(state['next_index'])


def random_batch(config: ml_collections.ConfigDict, rng: np.random.Generator,
                 batch_size: int) -> dict:
  """One whole batch of the synthetic task of `config.head.kind`."""
  c = config
  kw = dict(batch_size=batch_size, num_frames=c.data.num_frames,
            input_dim=c.model.frontend.input_dim)
  if c.head.kind == 'ctc':
    return synthetic.ctc_batch(rng, vocab_size=c.head.vocab_size,
                               num_labels=c.data.num_labels, **kw)
  return synthetic.classification_batch(rng, num_classes=c.head.num_classes, **kw)


def featurizer(config: ml_collections.ConfigDict) -> features.Featurizer:
  f = features.Featurizer.from_config(config.features)
  if f.num_mels != config.model.frontend.input_dim:
    raise ValueError(f'features.num_mels={f.num_mels} must equal model.frontend.input_dim='
                     f'{config.model.frontend.input_dim}')
  return f


def output_frames(config: ml_collections.ConfigDict) -> Callable[[int], int]:
  """num_samples -> encoder output frames, for the featurizer and frontend of `config`."""
  f = featurizer(config)
  fe = config.model.frontend
  if fe.kind == 'stacked':
    return lambda n: f.frames(n) // fe.stack

  def conv(n):
    t = f.frames(n)
    for _ in range(fe.num_layers):
      t = max((t - fe.kernel_size) // fe.stride + 1, 0)
    return t
  return conv


def make_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 model=None) -> train_step.Trainer:
  """Model (or `model`), optimizer and trainer as the config says."""
  model = model if model is not None else models.create_model(config, mesh)
  o = config.optim
  optimizer, schedule = optim.make_optimizer(
      learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
      decay_steps=config.train.num_steps, end_ratio=o.end_ratio, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm)
  frozen_dtype = models.dtype(config.train.frozen_dtype, 'train.frozen_dtype')
  return train_step.create_trainer(
      model, optimizer, schedule, task=config.head.kind, trainable=config.train.trainable,
      frozen_dtype=frozen_dtype, mesh=mesh,
      featurizer=featurizer(config) if config.data.name != 'random' else None,
      seed=config.seed, grad_accum_steps=config.train.grad_accum_steps)


def make_run_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                     ) -> tuple[train_step.Trainer, dict]:
  """The trainer of a run and the fingerprint of its base: the model built on `mesh`, its
  encoder loaded from `config.base.path` (or left at its `seed` init when that is empty)."""
  model = models.create_model(config, mesh)
  if config.base.path:
    checkpoints.load_base(config.base.path, model)
  fingerprint = checkpoints.base_fingerprint(config.model, model)
  return make_trainer(config, mesh, model), fingerprint


def _duration(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f'{m}m{s:02d}s' if m else f'{s}s'


def fit(trainer: train_step.Trainer, batches: Iterable[dict], *, num_steps: int,
        writer: MetricsWriter | None = None, log_every: int = 10, stage: str = 'train',
        on_log: Callable[[int, dict], None] | None = None, start_step: int = 0,
        after_step: Callable[[int], bool] | None = None) -> list[dict]:
  """Runs steps `start_step + 1 .. num_steps` over `batches`; logs loss, throughput and an ETA
  every `log_every` steps. `after_step(step)` runs after each step; True stops the loop there.
  Returns the logged metrics (the learning curve)."""
  curve, every = [], max(log_every, 1)
  skipped = jnp.zeros((), jnp.float32)  # non-finite steps, counted on device without a sync
  # Asynchronously dispatched sharded steps can deadlock in the collectives of simulated CPU
  # devices; elsewhere the host runs ahead while the accelerator works.
  sync_each_step = jax.default_backend() == 'cpu' and trainer.mesh.size > 1
  iterator = iter(batches)
  utterances, start, first_log, pace = 0, time.perf_counter(), None, 0.0
  for step in range(start_step + 1, num_steps + 1):
    batch = next(iterator)
    labels = batch['labels']
    # A host batch is this process's share of the global batch (all shares are equal).
    global_rows = isinstance(labels, jax.Array) and not labels.is_fully_addressable
    utterances += len(labels) * (1 if global_rows else jax.process_count())
    metrics = trainer.step(batch)
    if sync_each_step:
      jax.block_until_ready(metrics)
    skipped = skipped + (1.0 - metrics['applied'])
    if step % every == 0 or step == num_steps:
      last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - start
      done = step - start_step
      last.update(skipped_steps=float(skipped), steps_per_second=done / elapsed,
                  utterances_per_second=utterances / elapsed, elapsed_seconds=elapsed)
      curve.append({'step': step, **last})
      if writer is not None:
        writer.write(step, {'stage': stage, **last})
      if on_log is not None:
        on_log(step, last)
      # The ETA uses the pace since the first log line: the first steps include compilation.
      if first_log is None:
        first_log, pace = (step, elapsed), elapsed / done
      elif step > first_log[0]:
        pace = (elapsed - first_log[1]) / (step - first_log[0])
      logging.info('[%s] step %d/%d loss %.4f grad_norm %.3f lr %.2e | %.2f steps/s, '
                   'elapsed %s, ETA %s%s', stage, step, num_steps, last['loss'],
                   last['grad_norm'], last['learning_rate'], last['steps_per_second'],
                   _duration(elapsed), _duration((num_steps - step) * pace),
                   f" | {last['skipped_steps']:.0f} non-finite steps skipped"
                   if last['skipped_steps'] else '')
    # After the step's log line, so a checkpoint never holds a step whose metrics are lost.
    if after_step is not None and after_step(step):
      break
  return curve


def describe(trainer: train_step.Trainer) -> dict:
  n_train = partition.count_params(trainer.state.trainable)
  n_total = n_train + partition.count_params(trainer.frozen)
  logging.info('mesh %s; %d of %d parameters train (%.2f%%); frozen prefix: %s blocks',
               dict(trainer.mesh.shape), n_train, n_total, 100 * n_train / n_total,
               trainer.frozen_depth)
  return dict(trainable_params=n_train, total_params=n_total,
              trainable_fraction=n_train / n_total)


class Preemption:
  """Notes SIGTERM (what a TPU VM maintenance event sends) so the loop can save at a step
  boundary and exit.

  One process: a Python handler (restored on exit) notes the signal, and `reached(step)` is true
  from the next step boundary on. Several processes: the signal may reach only some of them, and
  all must save the same step, so JAX's preemption service (started by
  `jax.distributed.initialize`, which catches SIGTERM itself) agrees on a step that every
  process reaches; `reached` must then be called at every step by every process.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM: saving at the end of this step, then exiting')
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop."""
    if not self.requested and jax.process_count() > 1:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
      if self.requested:
        logging.warning('preemption notice: every process saves step %d, then exits', step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run_info(config: ml_collections.ConfigDict, fingerprint: dict) -> dict:
  """What a run checkpoint records besides arrays: the config, adapter fields and base."""
  return {'config': json.loads(config.to_json_best_effort()), 'base_fingerprint': fingerprint,
          'adapter': {k: config.adapter[k] for k in checkpoints.ADAPTER_FIELDS}}


def open_data(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh):
  """(speech data, tokenizer) of `config.data` (both None for the random task), prepared; sets
  the head's size from the data (the tokenizer's vocabulary or the number of classes)."""
  if config.data.name == 'random':
    return None, None
  # Imported here: the speech pipeline needs TFDS (and the `speech` extra for the corpus).
  from tpa_jax.data import datasets  # pylint: disable=import-outside-toplevel
  data = datasets.SpeechData.open(
      config.data, workdir=workdir, task=config.head.kind, frames=output_frames(config),
      # Each batch splits into grad_accum_steps micro-batches, each over the data axes.
      data_ways=mesh.shape['data'] * mesh.shape['fsdp'] * config.train.grad_accum_steps)
  data.prepare()
  tokenizer = None
  with config.unlocked():
    if config.head.kind == 'ctc':
      tokenizer = data.tokenizer(config.tokenizer, os.path.join(workdir, 'tokenizers'))
      config.head.vocab_size = tokenizer.vocab_size
    else:
      config.head.num_classes = data.num_classes
  return data, tokenizer


def evaluate_speech(config: ml_collections.ConfigDict, trainer: train_step.Trainer, data,
                    tokenizer, split: str, *, model=None) -> dict:
  """WER/CER (CTC, with `config.decoding`) or accuracy on `split` of `model` (default: the
  trainer's current model)."""
  evaluator = evaluation.Evaluator(config.head.kind, trainer.featurizer, trainer.mesh)
  decoder = None
  if config.head.kind == 'ctc':
    decoder = decoding.make_decoder(config.decoding, tokenizer,
                                    lambda: data.texts(config.data.train_split))
  return evaluator.evaluate(model if model is not None else trainer.model(),
                            data.eval_batches(split, tokenizer), tokenizer, decoder=decoder)


def write_json(path: str, value: dict) -> None:
  """Writes `value` to `path` from process 0 (atomically: a reader never sees half a file)."""
  if jax.process_index() != 0:
    return
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to `config.train.num_steps`, resuming from the newest committed checkpoint in
  `workdir/checkpoints`, saving every `config.checkpoint.every_steps` steps, at the end, and at
  the step boundary after a SIGTERM. Returns the last logged metrics (with the evaluation of
  `data.eval_split` for speech data, once the run is complete)."""
  with Preemption() as preemption:
    return _train(config, checkpoints.check_workdir(workdir), preemption)


def _train(config: ml_collections.ConfigDict, workdir: str, preemption: Preemption) -> dict:
  mesh = sharding.make_mesh(**config.mesh)
  data, tokenizer = open_data(config, workdir, mesh)
  trainer, fingerprint = make_run_trainer(config, mesh)
  info = describe(trainer)
  num_steps = config.train.num_steps
  if data is None:
    batches = RandomBatches(config, config.seed)
  else:
    batches = iter(data.train_loader(tokenizer, split=config.data.train_split,
                                     seed=config.seed, num_batches=num_steps))

  every = config.checkpoint.every_steps
  if every < 1:
    raise ValueError(f'checkpoint.every_steps must be >= 1, got {every}')
  ckpt = checkpoints.RunCheckpointer(os.path.join(workdir, 'checkpoints'),
                                     keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
  record = run_info(config, fingerprint)
  writer = None
  try:
    restored = ckpt.restore_latest(
        trainer.state, check=lambda info: checkpoints.check_compatible(
            info, fingerprint=fingerprint, adapter=record['adapter']))
    start = 0
    if restored is not None:
      start, trainer.state, data_state, _ = restored
      batches.set_state(data_state)
      logging.info('resumed from step %d of %s', start, ckpt.directory)
    writer = MetricsWriter(workdir)
    writer.truncate_after(start)  # steps after the checkpoint are run again

    def after_step(step: int) -> bool:
      # Every process asks at every step: with several, they agree on the step to stop at.
      stop = preemption.reached(step)
      if step % every == 0 or step == num_steps or stop:
        ckpt.save(step, trainer.state, data_state=batches.get_state(), run_info=record)
      return stop

    curve = fit(trainer, batches, num_steps=num_steps, writer=writer,
                log_every=config.train.log_every_steps, start_step=start,
                after_step=after_step)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  step = int(jax.device_get(trainer.state.step))
  results = {**(curve[-1] if curve else {'step': step}), **info, 'step': step,
             'base_fingerprint': fingerprint['id'], 'preempted': preemption.requested}
  if preemption.requested:
    logging.warning('preempted: step %d is saved in %s; relaunch to resume', step,
                    ckpt.directory)
  elif data is not None:
    results['eval'] = evaluate_speech(config, trainer, data, tokenizer, config.data.eval_split)
    logging.info('evaluation on %s: %s', config.data.eval_split, results['eval'])
  write_json(os.path.join(workdir, 'results.json'), results)
  return results
