"""Evaluating a run's newest checkpoint, an exported adapter file over its base, or a base with
its head (launch/evaluate.py).

Speech data: WER/CER (CTC, decoded as `config.decoding` says) or accuracy on a split of the
dataset. The random task: held-out batches of the synthetic task (a stream the training
batches never use); for CTC each label token counts as a word, so `wer` is the token error
rate (no character rate is given). The model is the one training evaluates: frozen weights
in `train.frozen_dtype`. Adapters whose spec differs from the config's are refused before any
of their arrays is read.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from tpa_jax import checkpoint, sharding
from tpa_jax.checkpoint import adapter_file
from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.data import random_task
from tpa_jax.errors import CheckpointError, ConfigError
from tpa_jax.eval import scoring
from tpa_jax.train import trainer as trainer_lib
from tpa_jax.train.metrics import write_json


def _run_reader(workdir: str) -> checkpoint.RunCheckpointer | None:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return None
  reader = checkpoint.RunCheckpointer(directory, async_save=False, read_only=True)
  if not reader.committed_steps():
    reader.close()
    return None
  return reader


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             mesh: jax.sharding.Mesh | None = None, *, split: str = '', head_path: str = '',
             adapters_path: str = '') -> dict:
  """Evaluates on `split` (default `config.data.eval_split`), over the base of
  `config.base.path`: the adapters exported to `adapters_path`; else the head saved at
  `head_path`; else the newest committed checkpoint in `workdir/checkpoints`. Writes
  `workdir/eval_<split>.json` (process 0) and returns it. `mesh` defaults to
  `sharding.program_mesh`: the config's mesh if it fits the devices here, else all of them on
  the data axis."""
  split = split or config.data.eval_split
  if not split and config.data.name != 'random':
    raise ConfigError("no split to evaluate: the config's data.eval_split is '' (the run "
                      'scored none); pass --split=test (or another split of the data)')
  mesh = mesh if mesh is not None else sharding.program_mesh(config.mesh)
  workdir = checkpoint.check_workdir(workdir)
  reader = None if adapters_path or head_path else _run_reader(workdir)
  if not (adapters_path or reader is not None or head_path):
    raise CheckpointError(
        f'nothing to evaluate: {workdir}/checkpoints has no committed checkpoint and neither '
        '--adapters nor --head is given; pass the workdir of a run, --adapters=<an adapter '
        'export> or --head=<the head saved with the base> (with --config.base.path=<the base>)')
  try:
    # -- data (sets the head's size from the tokenizer or the classes) -------------------------
    data = tokenizer = None
    if config.data.name != 'random':
      # Imported here: TFDS and TensorFlow load in seconds, and the random task needs neither.
      from tpa_jax.data import datasets  # pylint: disable=import-outside-toplevel
      data, tokenizer = datasets.open_for_config(config, workdir, mesh)

    # -- what is evaluated: its spec is checked before the base or any adapter is read --------
    if adapters_path:
      saved = adapter_file.read_spec(adapters_path)
      spec_lib.check(saved, spec_lib.from_config(config, saved.base_fingerprint),
                     what=adapters_path, saved_as='export')
    elif reader is not None:
      saved = checkpoint.saved_spec(reader.newest_run_info())
      spec_lib.check(saved, spec_lib.from_config(config, saved.base_fingerprint),
                     what=f'the run checkpoint in {reader.directory}')

    # -- the model over its base ----------------------------------------------------------------
    trainer = trainer_lib.from_config(config, mesh)
    fingerprint = trainer.base_fingerprint
    current = spec_lib.from_config(config, fingerprint['id'])

    # -- the trained arrays --------------------------------------------------------------------
    step = None
    if adapters_path:
      model = trainer.model()
      adapter_file.attach_adapters(adapters_path, model, current)
      evaluated = 'adapters'
      logging.info('evaluating %s over the base %s on %s', adapters_path, config.base.path, split)
    elif reader is not None:
      step, trainer.state, _, _ = reader.restore_latest(
          trainer.state, check=lambda info: checkpoint.check_run(info, current, reader.directory))
      model = trainer.model()
      evaluated = 'checkpoint'
      logging.info('evaluating step %d of %s on %s', step, reader.directory, split)
    else:
      model = trainer.model()
      nnx.update(model.head, checkpoint.restore_state(head_path, nnx.state(model.head)))
      evaluated = 'base'
      logging.info('evaluating the base %s with the head %s on %s', config.base.path or
                   f'(initialised from seed {config.seed})', head_path, split)
  finally:
    if reader is not None:
      reader.close()

  # -- scores ----------------------------------------------------------------------------------
  if data is None:
    evaluator = scoring.Evaluator(config.head.kind, None, mesh)
    result = evaluator.evaluate(
        model, random_task.random_eval_batches(config, mesh.shape['data'] * mesh.shape['fsdp']),
        random_task.TokenIds())
    result.pop('cer', None)  # the characters of '3 1 4' mean nothing
  else:
    result = scoring.evaluate_speech(config, model, trainer.featurizer, mesh, data, tokenizer, split)
  out = {'split': split, 'data': config.data.name, 'step': step, 'evaluated': evaluated,
         'base_fingerprint': fingerprint['id'], **result}
  write_json(os.path.join(workdir, f'eval_{split}.json'), out)
  logging.info('evaluation on %s: %s', split, result)
  return out


def default_workdir(adapters_path: str = '', head_path: str = '') -> str:
  """Where an export or a head is evaluated without a --workdir: `<export without
  .safetensors>.eval` (or `<head>.eval`) beside it. A run has no default: it is its workdir."""
  path = adapters_path or head_path
  if not path:
    raise ConfigError('--workdir is required to evaluate a run (its checkpoints/); without one, '
                      'pass --adapters=<an adapter export> or --head=<the head saved with the '
                      'base>, evaluated in <export or head>.eval/')
  path = os.path.normpath(path)
  stem = path[:-len('.safetensors')] if path.endswith('.safetensors') else path
  return stem + '.eval'


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config recorded with the newest committed checkpoint of the run in `workdir`."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise CheckpointError(
        f'no checkpoints in {workdir} (looked for {directory}); pass --config to evaluate a base '
        'or an adapter export')
  reader = checkpoint.RunCheckpointer(directory, async_save=False, read_only=True)
  try:
    return ml_collections.ConfigDict(reader.newest_run_info()['config'])
  finally:
    reader.close()
