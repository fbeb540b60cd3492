"""Linear probes of frozen representations, every layer and learning rate trained side by side.

The standard layer-wise diagnostic of a pre-trained encoder (SUPERB's, Yang et al. 2021): a
linear read-out per layer, each with the same budget and rate grid, says which layers hold what
a task needs. The inputs are a stack of layers, standardised with the train split's statistics
(per layer and channel) so that every layer meets the same rates:

- `ClassificationProbe`: utterance vectors [N, L, D] (the masked mean of each layer's frames)
  and class ids; a softmax classifier per layer, trained on the whole train split at once.
- `CTCProbe`: frames [L, B, T, D] of padded batches with their labels; a projection of every
  frame onto the vocabulary per layer, trained with CTC on one batch per step, scored by
  best-path decoding (CER and WER).

Every (layer, rate) pair has its own weights and Adam state; the losses are summed, so the pairs
never share a gradient. After `num_steps` the validation score chooses each layer's rate and the
test split is scored at that rate.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tpa_jax.eval import decoding, scoring


@dataclasses.dataclass(frozen=True)
class Standardizer:
  """Per-layer, per-channel mean and standard deviation of the train split: [L, D] each."""
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, sums: np.ndarray, squares: np.ndarray, count: float) -> 'Standardizer':
    """From sums and sums of squares [L, D] over `count` vectors (accumulated in float64)."""
    mean = sums / max(count, 1.0)
    var = np.maximum(squares / max(count, 1.0) - mean * mean, 0.0)
    return cls(mean.astype(np.float32), np.sqrt(var + 1e-6).astype(np.float32))

  def __call__(self, x: np.ndarray, axis: int) -> np.ndarray:
    """`x` with its layer axis at `axis` and channels last, standardised."""
    shape = [1] * x.ndim
    shape[axis], shape[-1] = self.mean.shape
    return ((x - self.mean.reshape(shape)) / self.std.reshape(shape)).astype(np.float32)


class _LinearProbes:
  """Weights w [L, R, D, K] and b [L, R, K], zero-initialised (a convex problem: every layer
  starts from the same place), and a jitted Adam step on `loss(params, *inputs)` whose step size
  is the rate of each weight's (layer, rate) pair."""

  def __init__(self, num_layers: int, dim: int, outputs: int, learning_rates: Sequence[float],
               loss):
    self.rates = tuple(float(r) for r in learning_rates)
    l, r = num_layers, len(self.rates)
    self.params = {'w': jnp.zeros((l, r, dim, outputs), jnp.float32),
                   'b': jnp.zeros((l, r, outputs), jnp.float32)}
    adam, lr_r = optax.scale_by_adam(), jnp.asarray(self.rates, jnp.float32)
    self.opt_state = adam.init(self.params)

    @jax.jit
    def step(params, opt_state, *inputs):
      value, grads = jax.value_and_grad(loss)(params, *inputs)
      updates, opt_state = adam.update(grads, opt_state)
      updates = jax.tree.map(lambda u: -u * lr_r.reshape((1, -1) + (1,) * (u.ndim - 2)), updates)
      return optax.apply_updates(params, updates), opt_state, value

    self._step = step

  def _update(self, *inputs) -> float:
    self.params, self.opt_state, value = self._step(self.params, self.opt_state, *inputs)
    return float(value)


def _choose(validation: np.ndarray, *, higher_is_better: bool) -> np.ndarray:
  """The rate index per layer with the best validation score (the first of ties)."""
  return (np.argmax if higher_is_better else np.argmin)(validation, axis=1)


class ClassificationProbe(_LinearProbes):
  """Softmax classifiers on utterance vectors, one per (layer, rate)."""

  def __init__(self, num_layers: int, dim: int, num_classes: int,
               learning_rates: Sequence[float]):
    def logits(params, x_nld):
      return jnp.einsum('nld,lrdc->lrnc', x_nld, params['w']) + params['b'][:, :, None]

    def loss(params, x_nld, y_n):
      per = optax.softmax_cross_entropy_with_integer_labels(logits(params, x_nld), y_n[None, None])
      return per.mean(-1).sum()  # each pair's mean; the sum keeps their gradients apart

    super().__init__(num_layers, dim, num_classes, learning_rates, loss)
    self._logits = jax.jit(logits)

  def fit(self, x_nld: np.ndarray, y_n: np.ndarray, num_steps: int) -> list[float]:
    """Full-batch steps; returns the summed loss per step."""
    x, y = jnp.asarray(x_nld, jnp.float32), jnp.asarray(y_n, jnp.int32)
    return [self._update(x, y) for _ in range(num_steps)]

  def accuracy(self, x_nld: np.ndarray, y_n: np.ndarray) -> np.ndarray:
    """Accuracy [L, R]."""
    predicted = np.asarray(jnp.argmax(self._logits(self.params, jnp.asarray(x_nld)), -1))
    return (predicted == np.asarray(y_n)[None, None]).mean(-1)

  def scores(self, validation: tuple, test: tuple) -> list[dict]:
    """Per layer: the chosen rate, its validation and test accuracy."""
    val, tst = self.accuracy(*validation), self.accuracy(*test)
    chosen = _choose(val, higher_is_better=True)
    return [{'layer': k, 'learning_rate': self.rates[c], 'validation': float(val[k, c]),
             'test': float(tst[k, c]), 'validation_by_rate': [float(v) for v in val[k]]}
            for k, c in enumerate(chosen)]


@dataclasses.dataclass
class CTCBatch:
  """A padded batch of frames of every layer, [L, B, T, D], with CTC labels and transcripts."""
  frames: np.ndarray
  mask: np.ndarray  # [B, T] bool
  labels: np.ndarray  # [B, U] int
  label_mask: np.ndarray  # [B, U] bool
  texts: list[str]


class CTCProbe(_LinearProbes):
  """Linear CTC read-outs of frames, one per (layer, rate); vocabulary id 0 is the blank."""

  def __init__(self, num_layers: int, dim: int, vocab_size: int,
               learning_rates: Sequence[float]):
    def logits(params, frames_lbtd):
      return (jnp.einsum('lbtd,lrdv->lrbtv', frames_lbtd, params['w'])
              + params['b'][:, :, None, None])

    def loss(params, frames_lbtd, mask_bt, labels_bu, label_mask_bu):
      z = logits(params, frames_lbtd)
      l_, r_, b, t, v = z.shape
      per = optax.ctc_loss(z.reshape(l_ * r_ * b, t, v),
                           jnp.tile(1.0 - mask_bt.astype(jnp.float32), (l_ * r_, 1)),
                           jnp.tile(labels_bu, (l_ * r_, 1)),
                           jnp.tile(1.0 - label_mask_bu.astype(jnp.float32), (l_ * r_, 1)),
                           blank_id=0).reshape(l_, r_, b)
      tokens = jnp.maximum(label_mask_bu.astype(jnp.float32).sum(), 1.0)
      return per.sum(-1).sum() / tokens  # per token within each pair, summed over pairs

    super().__init__(num_layers, dim, vocab_size, learning_rates, loss)
    self._log_probs = jax.jit(lambda p, f: jax.nn.log_softmax(logits(p, f), -1))

  def fit(self, batches: Sequence[CTCBatch], num_steps: int, *, seed: int = 0) -> list[float]:
    """One batch per step, in a shuffled order per pass over `batches`."""
    rng = np.random.default_rng(seed)
    order, losses = [], []
    for _ in range(num_steps):
      if not order:
        order = list(rng.permutation(len(batches)))
      b = batches[order.pop()]
      losses.append(self._update(jnp.asarray(b.frames, jnp.float32), jnp.asarray(b.mask),
                                 jnp.asarray(b.labels, jnp.int32), jnp.asarray(b.label_mask)))
    return losses

  def error_rates(self, batches: Sequence[CTCBatch], tokenizer) -> dict[str, np.ndarray]:
    """Best-path CER and WER [L, R] over every utterance of `batches`."""
    hyps, refs = None, []
    for b in batches:
      lp = np.asarray(self._log_probs(self.params, jnp.asarray(b.frames, jnp.float32)))
      if hyps is None:
        hyps = [[[] for _ in range(lp.shape[1])] for _ in range(lp.shape[0])]
      for k in range(lp.shape[0]):
        for r in range(lp.shape[1]):
          for i, m in enumerate(b.mask.astype(bool)):
            hyps[k][r].append(tokenizer.decode(decoding.best_path(lp[k, r, i][m])))
      refs += b.texts
    out = {'cer': np.zeros((len(hyps), len(hyps[0]))), 'wer': np.zeros((len(hyps), len(hyps[0])))}
    for k, per_rate in enumerate(hyps):
      for r, h in enumerate(per_rate):
        rates = scoring.error_rates(refs, h)
        out['cer'][k, r], out['wer'][k, r] = rates['cer'], rates['wer']
    return out

  def scores(self, validation: Sequence[CTCBatch], test: Sequence[CTCBatch],
             tokenizer) -> list[dict]:
    """Per layer: the rate with the lowest validation CER, its validation CER and its test
    CER and WER (best path)."""
    val, tst = self.error_rates(validation, tokenizer), self.error_rates(test, tokenizer)
    chosen = _choose(val['cer'], higher_is_better=False)
    return [{'layer': k, 'learning_rate': self.rates[c], 'validation': float(val['cer'][k, c]),
             'test': float(tst['cer'][k, c]), 'test_wer': float(tst['wer'][k, c]),
             'validation_by_rate': [float(v) for v in val['cer'][k]]}
            for k, c in enumerate(chosen)]
