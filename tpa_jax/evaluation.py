"""Evaluation: greedy CTC decoding, WER/CER (jiwer) and classification accuracy."""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tpa_jax import sharding
from tpa_jax.features import Featurizer
from tpa_jax.train_step import batch_inputs, batch_shardings


def greedy_ctc(ids_bt: np.ndarray, mask_bt: np.ndarray, blank_id: int = 0) -> list[list[int]]:
  """Best-path decoding: per-frame argmax ids -> merge repeats -> drop blanks (valid frames only)."""
  out = []
  for ids, mask in zip(np.asarray(ids_bt), np.asarray(mask_bt)):
    ids = ids[mask.astype(bool)]
    keep = np.ones(ids.shape, bool)
    keep[1:] = ids[1:] != ids[:-1]
    out.append([int(i) for i in ids[keep & (ids != blank_id)]])
  return out


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
  """Corpus-level word and character error rates (edit operations / reference length)."""
  import jiwer  # pylint: disable=import-outside-toplevel
  if len(references) != len(hypotheses) or not references:
    raise ValueError(f'need as many hypotheses as references (> 0), got {len(references)} '
                     f'references and {len(hypotheses)} hypotheses')
  # jiwer rejects empty hypotheses inside a list only when every one is empty; a single space
  # keeps it counting deletions.
  hypotheses = [h if h.strip() else ' ' for h in hypotheses]
  return {'wer': float(jiwer.wer(list(references), hypotheses)),
          'cer': float(jiwer.cer(list(references), hypotheses))}


class Evaluator:
  """Runs a model over evaluation batches under one jitted forward pass per bucket shape."""

  def __init__(self, task: str, featurizer: Featurizer | None, mesh: jax.sharding.Mesh,
               rules=sharding.DEFAULT_RULES):
    self.task, self.featurizer, self.mesh, self.rules = task, featurizer, mesh, rules

    def predict(graphdef, state, batch):
      with sharding.axis_rules(self.rules):
        model = nnx.merge(graphdef, state)
        features, mask = batch_inputs(batch, self.featurizer)
        logits, out_mask = model(features, mask)
      return jnp.argmax(logits, -1), out_mask

    # Replicated outputs: every process reads whole predictions (multi-host evaluation).
    self._predict = jax.jit(predict, static_argnums=0,
                            out_shardings=NamedSharding(mesh, P()))

  def predictions(self, model: nnx.Module, batches: Iterable[tuple[dict, list]]):
    """(argmax ids, output mask, references) per batch, padded rows removed."""
    graphdef, state = nnx.split(model)
    for batch, refs in batches:
      n = int(batch['weight'].sum())
      batch = {k: v for k, v in batch.items() if k != 'weight'}
      shardings = batch_shardings(batch, self.mesh)
      with jax.set_mesh(self.mesh):
        # Every process holds the whole evaluation batch: each device takes its slice.
        arrays = {k: jax.make_array_from_callback(v.shape, shardings[k],
                                                  lambda index, v=v: v[index])
                  for k, v in batch.items()}
        ids, mask = self._predict(graphdef, state, arrays)
      ids, mask = jax.device_get((ids, mask))
      yield ids[:n], mask[:n], (refs[:n] if refs is not None else batch['labels'][:n])

  def evaluate(self, model: nnx.Module, batches, tokenizer=None, *,
               num_examples: int = 3) -> dict:
    """CTC: {'wer', 'cer', 'num_utterances', 'examples'}; classification: {'accuracy', ...}."""
    if self.task == 'classification':
      correct = total = 0
      for ids, _, labels in self.predictions(model, batches):
        correct += int((ids == np.asarray(labels)).sum())
        total += len(labels)
      return {'accuracy': correct / max(total, 1), 'num_utterances': total}
    refs, hyps = [], []
    for ids, mask, texts in self.predictions(model, batches):
      hyps += [tokenizer.decode(seq) for seq in greedy_ctc(ids, mask)]
      refs += list(texts)
    return {**error_rates(refs, hyps), 'num_utterances': len(refs),
            'examples': [{'reference': r, 'hypothesis': h}
                         for r, h in zip(refs[:num_examples], hyps[:num_examples])]}
