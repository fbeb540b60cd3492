"""Evaluation of a run's newest checkpoint, or of a base with its head (launch/evaluate.py).

Speech data: WER/CER (CTC, decoded as `config.decoding` says) or accuracy on a split of the
dataset. The random task: held-out batches of the synthetic task (a stream the training
batches never use); for CTC each label token counts as a word, so `wer` is the token error
rate (no character rate is given). The model is the one training evaluates: frozen weights
in `train.frozen_dtype`.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from tpa_jax import checkpoints, evaluation, sharding, training

# The random task's evaluation set: this many batches of `data.eval_batch_size` utterances.
RANDOM_EVAL_BATCHES = 4


class TokenIds:
  """A CTC 'tokenizer' for the random task: token ids written as words ('3 1 4')."""

  def decode(self, ids) -> str:
    return ' '.join(str(int(i)) for i in ids)


def random_eval_batches(config: ml_collections.ConfigDict, data_ways: int):
  """(batch, references) of the random task's evaluation set: every process gets every row (as
  `evaluation.Evaluator` expects); references are the label ids as words (CTC) or None."""
  size = -(-config.data.eval_batch_size // data_ways) * data_ways
  for i in range(RANDOM_EVAL_BATCHES):
    # A third seed word keeps these batches apart from the training stream [seed, step].
    batch = training.random_batch(config, np.random.default_rng([config.seed, i, 1]), size)
    batch['weight'] = np.ones((size,), np.float32)
    refs = None
    if config.head.kind == 'ctc':
      refs = [TokenIds().decode(labels[mask])
              for labels, mask in zip(batch['labels'], batch['label_mask'])]
    yield batch, refs


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, split: str = '',
             head_path: str = '') -> dict:
  """Evaluates on `split` (default `config.data.eval_split`) the newest committed checkpoint in
  `workdir/checkpoints` or, when there is none, the base of `config.base.path` with the head
  saved at `head_path`. Writes `workdir/eval_<split>.json` (process 0) and returns it."""
  split = split or config.data.eval_split
  workdir = checkpoints.check_workdir(workdir)
  directory = os.path.join(workdir, 'checkpoints')
  reader = (checkpoints.RunCheckpointer(directory, async_save=False, read_only=True)
            if os.path.isdir(directory) else None)
  if reader is not None and not reader.committed_steps():
    reader.close()
    reader = None
  if reader is None and not head_path:
    raise checkpoints.CheckpointError(
        f'nothing to evaluate: {directory} has no committed checkpoint and no --head is given; '
        'pass the workdir of a run, or --head=<the head saved with the base> (and '
        '--config.base.path=<the base>)')

  mesh = sharding.make_mesh(**config.mesh)
  data, tokenizer = training.open_data(config, workdir, mesh)
  trainer, fingerprint = training.make_run_trainer(config, mesh)
  step = None
  if reader is not None:
    adapter = {k: config.adapter[k] for k in checkpoints.ADAPTER_FIELDS}
    try:
      step, trainer.state, _, _ = reader.restore_latest(
          trainer.state, check=lambda info: checkpoints.check_compatible(
              info, fingerprint=fingerprint, adapter=adapter))
    finally:
      reader.close()
    logging.info('evaluating step %d of %s on %s', step, directory, split)
    model = trainer.model()
  else:
    model = trainer.model()
    nnx.update(model.head, checkpoints.restore_state(head_path, nnx.state(model.head)))
    logging.info('evaluating the base %s with the head %s on %s', config.base.path or
                 f'(initialised from seed {config.seed})', head_path, split)

  if data is None:
    evaluator = evaluation.Evaluator(config.head.kind, None, mesh)
    result = evaluator.evaluate(
        model, random_eval_batches(config, mesh.shape['data'] * mesh.shape['fsdp']),
        TokenIds())
    result.pop('cer', None)  # the characters of '3 1 4' mean nothing
  else:
    result = training.evaluate_speech(config, trainer, data, tokenizer, split, model=model)
  out = {'split': split, 'data': config.data.name, 'step': step,
         'evaluated': 'checkpoint' if step is not None else 'base',
         'base_fingerprint': fingerprint['id'], **result}
  training.write_json(os.path.join(workdir, f'eval_{split}.json'), out)
  logging.info('evaluation on %s: %s', split, result)
  return out


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config recorded with the newest committed checkpoint of the run in `workdir`."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise checkpoints.CheckpointError(
        f'no checkpoints in {workdir} (looked for {directory}); pass --config to evaluate a base')
  reader = checkpoints.RunCheckpointer(directory, async_save=False, read_only=True)
  try:
    return ml_collections.ConfigDict(reader.newest_run_info()['config'])
  finally:
    reader.close()
