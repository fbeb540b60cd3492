"""Validation during training, and the best step: `train.eval_every_steps` scores the validation
split every that many steps (and at the last step), logs it (metrics.jsonl, TensorBoard), and
keeps the state of the best-scoring step in `<workdir>/best`, so a run's test score can be
taken once, at its best validation step.

The history lives in `<workdir>/validation.json` (written atomically at every evaluation). A
resumed run drops the entries after the step it resumes from and scores those steps again; as
resume is exact, it reaches the same scores, and the best state is saved again when it is.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from absl import logging

from tpa_jax import checkpoint
from tpa_jax.errors import CheckpointError, ConfigError
from tpa_jax.train.metrics import MetricsWriter, write_json

# Validation metric per head kind, and whether lower is better.
METRICS = {'ctc': ('wer', True), 'classification': ('accuracy', False)}
DECODINGS = ('greedy', 'config')


def check_config(config) -> None:
  """Named errors for the validation fields, before anything compiles."""
  t = config.train
  if int(t.eval_every_steps) < 0:
    raise ConfigError(f'train.eval_every_steps={t.eval_every_steps}: accepted values are 0 (no '
                      'validation) or a positive number of steps')
  if t.validation_decoding not in DECODINGS:
    raise ConfigError(f'train.validation_decoding={t.validation_decoding!r}: accepted values '
                      f'are {DECODINGS}')


def validation_config(config):
  """The config validation scores with: best-path decoding unless `config` is asked for
  (a lexicon decoder costs seconds per evaluation; steps and learning rates are chosen on it)."""
  if config.train.validation_decoding == 'config':
    return config
  c = config.copy_and_resolve_references()
  c.decoding.kind = 'greedy'
  return c


class BestStep:
  """Scores validation, keeps the history and the best step's state."""

  def __init__(self, workdir: str, head_kind: str, score: Callable[[], dict],
               writer: MetricsWriter | None, run_info: dict):
    self.metric, self.lower_is_better = METRICS[head_kind]
    self.path = os.path.join(workdir, 'validation.json')
    self.score, self.writer, self.run_info = score, writer, run_info
    self.checkpoints = checkpoint.RunCheckpointer(os.path.join(workdir, 'best'), keep=1,
                                                  async_save=False)
    self.history: list[dict] = []
    self.seconds = 0.0  # spent scoring, in this process

  def resume(self, start: int) -> None:
    """Reads the history up to `start` (the steps after it run again)."""
    if os.path.exists(self.path):
      with open(self.path) as f:
        saved = json.load(f)
      self.history = [h for h in saved['history'] if h['step'] <= start]
      self.seconds = saved.get('seconds', 0.0)

  @property
  def best(self) -> dict | None:
    if not self.history:
      return None
    # Equal word error rates are told apart by the character error rate; then the earliest.
    key = lambda h: ((h[self.metric], h.get('cer', 0.0)) if self.lower_is_better
                     else (-h[self.metric],))
    return min(self.history, key=key)

  def evaluate(self, step: int, state, data_state: dict) -> dict:
    """Scores the model at `step`; saves `state` as the best when it beats every earlier step."""
    t0 = time.perf_counter()
    result = self.score()
    self.seconds += time.perf_counter() - t0
    entry = {'step': step, self.metric: result[self.metric],
             **{k: result[k] for k in ('cer',) if k in result}}
    previous = self.best
    self.history = [h for h in self.history if h['step'] != step] + [entry]
    self.history.sort(key=lambda h: h['step'])
    if self.best is entry and (previous is None or previous['step'] != step):
      self.checkpoints.save(step, state, data_state=data_state, run_info=self.run_info)
      self.checkpoints.wait()
    write_json(self.path, self.summary())
    if self.writer is not None:
      self.writer.write(step, {'stage': 'validation', **{k: v for k, v in entry.items()
                                                         if k != 'step'}})
    best = self.best
    logging.info('validation at step %d: %s %.4f (best %.4f at step %d)', step, self.metric,
                 entry[self.metric], best[self.metric], best['step'])
    return entry

  def summary(self) -> dict:
    best = self.best
    return {'metric': self.metric, 'history': self.history, 'seconds': round(self.seconds, 2),
            'best_step': best['step'] if best else None,
            'best': best[self.metric] if best else None}

  def restore_best(self, state_target):
    """The state of the best step (checked to be that step)."""
    best = self.best
    restored = self.checkpoints.restore_latest(state_target)
    if best is None or restored is None or restored[0] != best['step']:
      raise CheckpointError(
          f'{self.checkpoints.directory} holds step {restored[0] if restored else None}, but '
          f'the best validation step in {self.path} is {best and best["step"]}')
    return restored[1]

  def close(self) -> None:
    self.checkpoints.close()


def due(step: int, every: int, num_steps: int) -> bool:
  return every > 0 and (step % every == 0 or step == num_steps)
