"""The training loop: mesh, model, trainer, data, steps with progress, metrics in the workdir."""

from __future__ import annotations

import json
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tpa_jax import models, optim, partition, sharding, synthetic, train_step


def random_batches(config: ml_collections.ConfigDict, seed: int) -> Iterator[dict]:
  """The synthetic learnable task of `tpa_jax.synthetic`, shaped by `config.data`."""
  if config.data.name != 'random':
    raise ValueError(f"data.name={config.data.name!r}: accepted values are ('random',)")
  rng = np.random.default_rng(seed)
  kw = dict(batch_size=config.train.batch_size, num_frames=config.data.num_frames,
            input_dim=config.model.frontend.input_dim)
  while True:
    if config.head.kind == 'ctc':
      yield synthetic.ctc_batch(rng, vocab_size=config.head.vocab_size,
                                num_labels=config.data.num_labels, **kw)
    else:
      yield synthetic.classification_batch(rng, num_classes=config.head.num_classes, **kw)


def make_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> train_step.Trainer:
  """Model, optimizer and trainer as the config says."""
  model = models.create_model(config, mesh)
  o = config.optim
  optimizer, schedule = optim.make_optimizer(
      learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
      decay_steps=config.train.num_steps, end_ratio=o.end_ratio, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm)
  frozen_dtype = models.dtype(config.train.frozen_dtype, 'train.frozen_dtype')
  return train_step.create_trainer(model, optimizer, schedule, task=config.head.kind,
                                   trainable=config.train.trainable, frozen_dtype=frozen_dtype,
                                   mesh=mesh)


class MetricsWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, step: int, metrics: dict) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains for `config.train.num_steps` steps; returns the last logged metrics."""
  # -- mesh and model --------------------------------------------------------------------
  mesh = sharding.make_mesh(**config.mesh)
  trainer = make_trainer(config, mesh)
  n_train = partition.count_params(trainer.state.trainable)
  n_total = n_train + partition.count_params(trainer.frozen)
  logging.info('mesh %s; %d of %d parameters train (%.2f%%); frozen prefix: %s blocks',
               dict(mesh.shape), n_train, n_total, 100 * n_train / n_total, trainer.frozen_depth)

  # -- input and ahead-of-time compile ---------------------------------------------------
  batches = random_batches(config, config.seed)
  first = next(batches)
  start = time.perf_counter()
  compiled = trainer.compile(first)
  memory = compiled.memory_analysis()
  logging.info('compiled the step in %.1fs; per device: arguments %.1f MB, temp %.1f MB',
               time.perf_counter() - start, memory.argument_size_in_bytes / 1e6,
               memory.temp_size_in_bytes / 1e6)

  # -- loop ------------------------------------------------------------------------------
  writer = MetricsWriter(workdir)
  num_steps, every = config.train.num_steps, max(config.train.log_every_steps, 1)
  batch, last, loop_start = first, {}, time.perf_counter()
  skipped = jnp.zeros((), jnp.float32)  # non-finite steps, counted on device without a sync
  # Asynchronously dispatched sharded steps can deadlock in the collectives of simulated CPU
  # devices; elsewhere the host runs ahead while the accelerator works.
  sync_each_step = jax.default_backend() == 'cpu' and mesh.size > 1
  for step in range(1, num_steps + 1):
    metrics = trainer.step(batch)
    if sync_each_step:
      jax.block_until_ready(metrics)
    skipped = skipped + (1.0 - metrics['applied'])
    batch = next(batches)
    if step % every == 0 or step == num_steps:
      last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - loop_start
      last['skipped_steps'] = float(skipped)
      last['steps_per_second'] = step / elapsed
      last['utterances_per_second'] = step * config.train.batch_size / elapsed
      writer.write(step, last)
      eta = (num_steps - step) * elapsed / step
      logging.info('step %d/%d loss %.4f grad_norm %.3f lr %.2e | %.2f steps/s, ETA %.0fs%s',
                   step, num_steps, last['loss'], last['grad_norm'], last['learning_rate'],
                   last['steps_per_second'], eta,
                   f" | {last['skipped_steps']:.0f} non-finite steps skipped"
                   if last['skipped_steps'] else '')
  last.update(trainable_params=n_train, total_params=n_total,
              trainable_fraction=n_train / n_total)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(last, f, indent=2)
  return last
