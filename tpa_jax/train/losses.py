"""Task losses in float32: CTC for speech recognition, cross-entropy for utterance classification,
BEST-RQ's masked prediction for self-supervised pre-training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tpa_jax.errors import ConfigError

TASKS = ('ctc', 'classification', 'best_rq')


def ctc_loss(logits_btv: jax.Array, mask_bt: jax.Array, labels_bu: jax.Array,
             label_mask_bu: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CTC loss per label token over the batch (blank id 0); utterances without labels count 0."""
  per_seq = optax.ctc_loss(logits_btv.astype(jnp.float32), 1.0 - mask_bt.astype(jnp.float32),
                           labels_bu, 1.0 - label_mask_bu.astype(jnp.float32), blank_id=0)
  n_labels_b = label_mask_bu.astype(jnp.float32).sum(-1)
  has_labels = n_labels_b > 0
  total = jnp.where(has_labels, per_seq, 0.0).sum()
  tokens = n_labels_b.sum()
  return total / jnp.maximum(tokens, 1.0), {'tokens': tokens}


def classification_loss(logits_bc: jax.Array,
                        labels_b: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over utterances, with accuracy."""
  logits_bc = logits_bc.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_bc, labels_b).mean()
  accuracy = (logits_bc.argmax(-1) == labels_b).astype(jnp.float32).mean()
  return loss, {'accuracy': accuracy}


def masked_prediction_loss(logits_btnc: jax.Array, targets_btn: jax.Array, masked_bt: jax.Array
                                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over masked frames and codebooks, and per-codebook accuracy at masked
  frames. Frames (and targets) beyond the shorter of the logits' and targets' lengths are
  dropped: a conv frontend may emit a frame or two fewer than T // stack."""
  t = min(logits_btnc.shape[1], targets_btn.shape[1], masked_bt.shape[1])
  logits, targets, w = logits_btnc[:, :t], targets_btn[:, :t], masked_bt[:, :t]
  w = w.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]  # [B, T, N]
  frames = jnp.maximum(w.sum(), 1.0)
  loss = (nll * w[..., None]).sum() / (frames * nll.shape[-1])
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  accuracy = (correct * w[..., None]).sum((0, 1)) / frames  # [N]
  return loss, {'loss': loss, 'accuracy': accuracy, 'masked_frames': w.sum()}


def best_rq_loss(logits_btnc: jax.Array, batch: dict[str, jax.Array]
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BEST-RQ's loss (tpa_jax.nn.best_rq) and metrics: masked-prediction cross-entropy, accuracy per codebook
  at masked frames (`accuracy_<n>`), and codebook usage per codebook (`codebook_usage_<n>`: the
  fraction of entries that are the target of some valid frame of the batch)."""
  targets, masked = batch['ssl_targets'], batch['ssl_masked']
  value, aux = masked_prediction_loss(logits_btnc, targets, masked)
  n, c = targets.shape[-1], logits_btnc.shape[-1]
  metrics = {'masked_frames': aux['masked_frames']}
  valid = batch['ssl_valid']
  for i in range(n):
    metrics[f'accuracy_{i}'] = aux['accuracy'][i]
    hits = jnp.zeros((c,), jnp.float32).at[targets[..., i].reshape(-1)].max(
        valid.reshape(-1).astype(jnp.float32))
    metrics[f'codebook_usage_{i}'] = hits.mean()
  return value, metrics


# task -> {batch key: (rank, dtype kind)}; kinds as numpy's dtype.kind ('i' int, 'b' bool).
LABEL_SPECS = {
    'ctc': {'labels': (2, 'i'), 'label_mask': (2, 'b')},
    'classification': {'labels': (1, 'i')},
    'best_rq': {},  # self-supervised: targets come from the audio (tpa_jax.nn.best_rq)
}
_KIND_NAMES = {'i': 'an integer dtype', 'b': 'bool'}


def check_labels(task: str, batch: dict) -> None:
  """Rejects missing label arrays or ones of the wrong rank or dtype, naming the key."""
  if task not in LABEL_SPECS:
    raise ConfigError(f'head.kind={task!r}: accepted values are {TASKS}')
  for key, (rank, kind) in LABEL_SPECS[task].items():
    if key not in batch:
      raise KeyError(f'a {task} batch needs {key!r}; it has {sorted(batch)}')
    x = batch[key]
    if len(x.shape) != rank or jnp.dtype(x.dtype).kind not in (kind, 'u' if kind == 'i' else kind):
      raise TypeError(f'{key} must have rank {rank} and {_KIND_NAMES[kind]} for a {task} batch, '
                      f'got shape {tuple(x.shape)} and {x.dtype}')


def task_loss(task: str, logits: jax.Array, mask_bt: jax.Array,
              batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of `task` for a batch with `labels` (+ `label_mask` for CTC), or BEST-RQ's
  targets and masks (added by the train step)."""
  check_labels(task, batch)
  if task == 'best_rq':
    return best_rq_loss(logits, batch)
  if task == 'ctc':
    return ctc_loss(logits, mask_bt, batch['labels'], batch['label_mask'])
  return classification_loss(logits, batch['labels'])
