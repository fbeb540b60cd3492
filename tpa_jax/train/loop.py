"""The training loop: `train(config, workdir)` runs one job; `fit` is the step loop, shared with
the demo.

A job runs on the synthetic random task (`data.name='random'`) or on a TFDS speech dataset
(audio featurized on device). With several processes (`tpa_jax.programs.distributed`) every
process runs this same code: each reads its own rows of every global batch, all take part in
every step and checkpoint save, and process 0 alone writes the metrics and results files.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from tpa_jax import checkpoint, sharding
from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.data import random_task
from tpa_jax.errors import ConfigError
from tpa_jax.eval import scoring
from tpa_jax.nn.params import FixedArray
from tpa_jax.train import partition, trainer as trainer_lib, validation
from tpa_jax.train.metrics import MetricsWriter, write_json
from tpa_jax.train.preemption import Preemption


def _duration(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f'{m}m{s:02d}s' if m else f'{s}s'


def fit(trainer: trainer_lib.Trainer, batches: Iterable[dict], *, num_steps: int,
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
    rows = next(batch[k] for k in ('labels', 'audio', 'features') if k in batch)
    # A host batch is this process's share of the global batch (all shares are equal).
    global_rows = isinstance(rows, jax.Array) and not rows.is_fully_addressable
    utterances += len(rows) * (1 if global_rows else jax.process_count())
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


def describe(trainer: trainer_lib.Trainer) -> dict:
  """Logs and returns the trainable and total parameter counts."""
  n_train = partition.count_params(trainer.state.trainable)
  n_total = n_train + partition.count_params(trainer.frozen)
  logging.info('mesh %s; %d of %d parameters train (%.2f%%); frozen prefix: %s blocks',
               dict(trainer.mesh.shape), n_train, n_total, 100 * n_train / n_total,
               trainer.frozen_depth)
  return dict(trainable_params=n_train, total_params=n_total,
              trainable_fraction=n_train / n_total)


def keep_fixed_arrays(trainer: trainer_lib.Trainer, workdir: str) -> None:
  """A run's fixed random arrays (BEST-RQ's projection and codebooks: never trained, no
  optimizer state) are saved in `workdir/fixed_arrays` when the run starts, and a resumed run
  takes them from there: the run keeps its own arrays whatever the code would draw now."""
  fixed = trainer.rest.filter(FixedArray)
  if not jax.tree.leaves(fixed):
    return
  path = os.path.join(workdir, 'fixed_arrays')
  if checkpoint.read_metadata(path) is not None:
    trainer.rest = nnx.merge_state(trainer.rest, checkpoint.restore_state(path, fixed))
    logging.info('fixed arrays restored from %s', path)
  else:
    checkpoint.save_state(path, fixed, metadata={'kind': 'fixed_arrays'})


def train(config: ml_collections.ConfigDict, workdir: str, *,
          finish: Callable[[trainer_lib.Trainer], dict | None] | None = None) -> dict:
  """Trains to `config.train.num_steps`, resuming from the newest committed checkpoint in
  `workdir/checkpoints`, saving every `config.checkpoint.every_steps` steps, at the end, and at
  the step boundary after a SIGTERM. Returns the last logged metrics (with the evaluation of
  `data.eval_split` for speech data with a task head, once the run is complete). `finish`
  runs on the trained trainer of a complete run (pre-training writes its base there); what it
  returns joins the results."""
  every = config.checkpoint.every_steps
  if every < 1:
    raise ConfigError(f'checkpoint.every_steps={every}: accepted values are integers >= 1')
  workdir = checkpoint.check_workdir(workdir)
  with Preemption() as preemption:
    # -- mesh -------------------------------------------------------------------------------
    mesh = sharding.make_mesh(**config.mesh)

    # -- data (speech data sets the head's size: the tokenizer's or the classes') -----------
    num_steps = config.train.num_steps
    if config.data.name == 'random':
      data = tokenizer = None
      batches = random_task.RandomBatches(config, config.seed)
    else:
      # Imported here: the speech pipeline needs TFDS (and the `speech` extra for the corpus).
      from tpa_jax.data import datasets  # pylint: disable=import-outside-toplevel
      data, tokenizer = datasets.open_for_config(config, workdir, mesh)
      batches = iter(data.train_loader(tokenizer, split=config.data.train_split,
                                       seed=config.seed, num_batches=num_steps))
    # Validation scores a task head (WER, accuracy); pre-training has none to score.
    scored_head = data is not None and config.head.kind in validation.METRICS
    eval_every = int(config.train.eval_every_steps) if scored_head else 0

    # -- model and base, state, step ----------------------------------------------------------
    trainer = trainer_lib.from_config(config, mesh)
    info = describe(trainer)
    keep_fixed_arrays(trainer, workdir)
    record = checkpoint.run_info(config, trainer.base_fingerprint)
    spec = spec_lib.AdapterSpec.from_json(record['spec'])

    # -- checkpoint: resume from the newest committed step ----------------------------------
    ckpt = checkpoint.RunCheckpointer(os.path.join(workdir, 'checkpoints'),
                                      keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    writer = best = None
    try:
      restored = ckpt.restore_latest(
          trainer.state, check=lambda saved: checkpoint.check_run(saved, spec, ckpt.directory))
      start = 0
      if restored is not None:
        start, trainer.state, data_state, _ = restored
        batches.set_state(data_state)
        logging.info('resumed from step %d of %s', start, ckpt.directory)
      writer = MetricsWriter(workdir)
      writer.truncate_after(start)  # steps after the checkpoint are run again
      if eval_every:
        scored = validation.validation_config(config)
        best = validation.BestStep(
            workdir, config.head.kind, writer=writer, run_info=record,
            score=lambda: scoring.evaluate_speech(scored, trainer.model(), trainer.featurizer,
                                                   mesh, data, tokenizer,
                                                   config.data.validation_split))
        best.resume(start)

      # -- loop -------------------------------------------------------------------------------
      def after_step(step: int) -> bool:
        # Every process asks at every step: with several, they agree on the step to stop at.
        stop = preemption.reached(step)
        if best is not None and validation.due(step, eval_every, num_steps):
          best.evaluate(step, trainer.state, batches.get_state())
        if step % every == 0 or step == num_steps or stop:
          ckpt.save(step, trainer.state, data_state=batches.get_state(), run_info=record)
        return stop

      curve = fit(trainer, batches, num_steps=num_steps, writer=writer,
                  log_every=config.train.log_every_steps, start_step=start,
                  after_step=after_step)
      if best is not None and not preemption.requested:
        # Test is scored once, with the state of the best validation step.
        trainer.state = best.restore_best(trainer.state)
    finally:
      ckpt.close()
      if writer is not None:
        writer.close()
      if best is not None:
        best.close()

  # -- results ----------------------------------------------------------------------------------
  step = int(jax.device_get(trainer.state.step))
  if best is not None and not preemption.requested:
    step = num_steps  # the state is the best step's; the run trained to the end
  results = {**(curve[-1] if curve else {'step': step}), **info, 'step': step,
             'base_fingerprint': trainer.base_fingerprint['id'],
             'preempted': preemption.requested}
  if preemption.requested:
    logging.warning('preempted: step %d is saved in %s; relaunch to resume', step,
                    ckpt.directory)
  else:
    if best is not None:
      results['validation'] = best.summary()
  if data is not None:  # examples the pipeline skipped (each logged with its reason)
    results['skipped_examples'] = data.skipped
  if finish is not None and not preemption.requested:
    results.update(finish(trainer) or {})
  if scored_head and config.data.eval_split and not preemption.requested:
    results['eval'] = scoring.evaluate_speech(config, trainer.model(), trainer.featurizer,
                                               mesh, data, tokenizer, config.data.eval_split)
    results['eval']['step'] = (best.best['step'] if best is not None
                               else int(jax.device_get(trainer.state.step)))
    logging.info('evaluation on %s: %s', config.data.eval_split, results['eval'])
  write_json(os.path.join(workdir, 'results.json'), results)
  return results
