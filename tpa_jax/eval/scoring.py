"""Scoring a model on evaluation batches: CTC decoding (best path, or a lexicon decoder), WER/CER
(jiwer), accuracy, and the evaluation of a speech dataset's split that training and the
programs share (`evaluate_speech`)."""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tpa_jax import sharding
from tpa_jax.audio.featurizer import Featurizer
from tpa_jax.data.batches import batch_inputs, batch_shardings
from tpa_jax.eval import decoding


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
  """Corpus-level word and character error rates (edit operations / reference length)."""
  import jiwer  # pylint: disable=import-outside-toplevel  (the `speech` extra)
  if len(references) != len(hypotheses) or not references:
    raise ValueError(f'need as many hypotheses as references (> 0), got {len(references)} '
                     f'references and {len(hypotheses)} hypotheses')
  # jiwer rejects empty hypotheses inside a list only when every one is empty; a single space
  # keeps it counting deletions.
  hypotheses = [h if h.strip() else ' ' for h in hypotheses]
  return {'wer': float(jiwer.wer(list(references), hypotheses)),
          'cer': float(jiwer.cer(list(references), hypotheses))}


@functools.lru_cache(maxsize=16)
def evaluator(task: str, featurizer: Featurizer | None, mesh: jax.sharding.Mesh) -> 'Evaluator':
  """A shared Evaluator: evaluations every few steps reuse its compiled forward passes."""
  return Evaluator(task, featurizer, mesh)


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
      if self.task == 'classification':
        return jnp.argmax(logits, -1), out_mask
      return jax.nn.log_softmax(logits.astype(jnp.float32), -1), out_mask

    # Replicated outputs: every process reads whole predictions (multi-host evaluation).
    self._predict = jax.jit(predict, static_argnums=0,
                            out_shardings=NamedSharding(mesh, P()))

  def predictions(self, model: nnx.Module, batches: Iterable[tuple[dict, list]]):
    """(outputs, output mask, references) per batch, padded rows removed. Outputs are class ids
    [B] for classification and log-probabilities [B, T, V] for CTC; references are the class
    ids for classification, else the transcripts (or, without them, the label tokens)."""
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
        outputs, mask = self._predict(graphdef, state, arrays)
      outputs, mask = jax.device_get((outputs, mask))
      # Speech batches carry transcripts beside the labels; classification scores the labels.
      use_labels = refs is None or self.task == 'classification'
      yield outputs[:n], mask[:n], (batch['labels'][:n] if use_labels else refs[:n])

  def evaluate(self, model: nnx.Module, batches, tokenizer=None, *, decoder=None,
               num_examples: int = 3) -> dict:
    """CTC: {'wer', 'cer', 'num_utterances', 'examples'} from `decoder` (a
    `decoding.LexiconDecoder`) or, without one, from best-path decoding; with a decoder the
    best-path rates are also given, as 'greedy_wer' and 'greedy_cer'.
    Classification: {'accuracy', 'num_utterances'}."""
    if self.task == 'classification':
      correct = total = 0
      for ids, _, labels in self.predictions(model, batches):
        correct += int((ids == np.asarray(labels)).sum())
        total += len(labels)
      return {'accuracy': correct / max(total, 1), 'num_utterances': total}
    refs, greedy, decoded = [], [], []
    for log_probs, mask, texts in self.predictions(model, batches):
      for lp, m in zip(log_probs, mask.astype(bool)):
        greedy.append(tokenizer.decode(decoding.best_path(lp[m])))
        if decoder is not None:
          decoded.append(decoder.decode(lp[m]))
      refs += list(texts)
    hyps = decoded if decoder is not None else greedy
    out = {**error_rates(refs, hyps), 'num_utterances': len(refs),
           'examples': [{'reference': r, 'hypothesis': h}
                        for r, h in zip(refs[:num_examples], hyps[:num_examples])]}
    if decoder is not None:
      out.update({f'greedy_{k}': v for k, v in error_rates(refs, greedy).items()})
    return out


def evaluate_speech(config: ml_collections.ConfigDict, model: nnx.Module,
                    featurizer: Featurizer | None, mesh: jax.sharding.Mesh, data,
                    tokenizer, split: str) -> dict:
  """WER/CER (CTC, with `config.decoding`) or accuracy of `model` on `split` of `data` (a
  `data.datasets.SpeechData`, with its `tokenizer`)."""
  scorer = evaluator(config.head.kind, featurizer, mesh)
  decoder = None
  if config.head.kind == 'ctc':
    decoder = decoding.make_decoder(config.decoding, tokenizer,
                                    lambda: data.texts(config.data.train_split))
  return scorer.evaluate(model, data.eval_batches(split, tokenizer), tokenizer, decoder=decoder)
