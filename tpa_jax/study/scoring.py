"""Scoring a study cell: test once, with the state of its best validation step; the pruning
curve without retraining; the step's FLOPs against full fine-tuning's."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import logging

from tpa_jax import checkpoint
from tpa_jax.data import datasets
from tpa_jax.errors import CheckpointError
from tpa_jax.eval import scoring as eval_scoring
from tpa_jax.nn import adapters as adapters_lib
from tpa_jax.plan import costs
from tpa_jax.study.cells import Cell
from tpa_jax.train import trainer as trainer_lib


def best_state(trainer, folder: str):
  """(step, state) of the run's best validation step, checked against its history."""
  with open(os.path.join(folder, 'validation.json')) as f:
    best_step = json.load(f)['best_step']
  reader = checkpoint.RunCheckpointer(os.path.join(folder, 'best'), async_save=False,
                                      read_only=True)
  try:
    restored = reader.restore_latest(trainer.state)
  finally:
    reader.close()
  if restored is None or restored[0] != best_step:
    raise CheckpointError(f'{folder}/best holds step {restored and restored[0]}, but the best '
                          f'validation step is {best_step}')
  return restored[0], restored[1]


def score(config: ml_collections.ConfigDict, folder: str, mesh, *, pruning: bool) -> dict:
  """Test scores of the run in `folder` at its best validation step; with `pruning`, also with
  its adapters removed from the lowest k blocks, k = 0 .. N, and from the highest k (no
  retraining): which end of the encoder the adapters matter at."""
  config = ml_collections.ConfigDict(config.to_dict())
  split = 'test'
  data, tokenizer = datasets.open_for_config(config, folder, mesh)
  trainer = trainer_lib.from_config(config, mesh)
  step, trainer.state = best_state(trainer, folder)
  model = trainer.model()

  def test(m) -> dict:
    r = eval_scoring.evaluate_speech(config, m, trainer.featurizer, mesh, data, tokenizer, split)
    if config.head.kind == 'ctc':
      return {'test': r['wer'], 'cer_test': r['cer'],
              'best_path_test': r.get('greedy_wer', r['wer']),
              'num_utterances': r['num_utterances']}
    return {'test': r['accuracy'], 'num_utterances': r['num_utterances']}

  out = {'step': step, **test(model)}
  if pruning:
    blocks = model.encoder.adapter_blocks
    scores = {(): out}  # removed blocks -> scores (removing all is the same from either end)

    def point(removed) -> dict:
      if removed not in scores:
        scores[removed] = test(adapters_lib.without_blocks(model, removed))
      r = scores[removed]
      return {'test': r['test'], **({'best_path_test': r['best_path_test']}
                                     if 'best_path_test' in r else {})}

    n = len(blocks)
    out['pruning'] = [{'removed_lowest': k, **point(tuple(blocks[:k]))} for k in range(n + 1)]
    out['pruning_from_top'] = [{'removed_highest': k, **point(tuple(blocks[n - k:]))}
                               for k in range(n + 1)]
    logging.info('adapters removed from the lowest k blocks: %s; from the highest: %s',
                 [p['test'] for p in out['pruning']], [p['test'] for p in out['pruning_from_top']])
  return out


def flops_ratio(study, task, method: str) -> float | None:
  """FLOPs of one training step of `method` over full fine-tuning's on the same batch (counted
  on the jaxpr, every scanned layer included); None when not counted yet and the study has no
  mesh (a report only)."""
  flops, full = step_flops(study, task, method), step_flops(study, task, 'full')
  return None if flops is None or full is None else round(flops / full, 4)


def step_flops(study, task, method: str) -> float | None:
  """FLOPs of one training step of `method` on `task`'s first batch, cached in
  `<workdir>/flops/<task>/<method>.json` (the workers of a study count them as their cells
  finish, so the report does not wait for them)."""
  path = os.path.join(study.workdir, 'flops', task.short, f'{method}.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)['flops']
  if study.mesh is None:
    return None
  config = study.run_config(Cell(task, method, study.rates[0], 0))
  config.base.path = ''
  data, tokenizer = datasets.open_for_config(config, study.workdir, study.mesh)
  batch = next(iter(data.train_loader(tokenizer, seed=0, num_batches=1)))
  shapes = trainer_lib.from_config(config, study.mesh, abstract=True)
  with jax.set_mesh(study.mesh):
    flops = float(costs.jaxpr_flops(shapes.step_fn, shapes.state, shapes.frozen, shapes.rest,
                                    batch))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'  # several workers may count the same one
  with open(tmp, 'w') as f:
    json.dump({'flops': flops}, f)
  os.replace(tmp, path)
  return flops
