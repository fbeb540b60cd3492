"""The config sections of BEST-RQ pre-training (pure Python: config files compose them):
`ssl` (the quantizer, masking and noise of `tpa_jax.nn.best_rq`), `ssl_pretrain` (the stage's
data, steps and optimizer), the demo-size and tiny stages, and the run config of a pre-training
run (`tpa_jax.ssl.pretrain` runs it)."""

from __future__ import annotations

import ml_collections

from tpa_jax.config import presets
from tpa_jax.errors import ConfigError


def ssl_fields() -> ml_collections.ConfigDict:
  """BEST-RQ: the quantizer, masking and noise."""
  s = ml_collections.ConfigDict()
  # Codebook entries (targets per codebook), their dimension, and independent codebooks.
  s.codebook_size = 8192
  s.code_dim = 16
  s.num_codebooks = 1
  # Feature frames stacked per target: 0 takes the frontend's subsampling factor (it must be
  # that factor: one target per encoder frame).
  s.stack = 0
  # Each valid encoder frame starts a masked span with this probability; spans cover this many
  # encoder frames.
  s.mask_prob = 0.01
  s.mask_span = 10
  # Standard deviation of the noise that replaces masked features.
  s.noise_std = 0.1
  return s


def schedule_fields() -> ml_collections.ConfigDict:
  """`ssl_pretrain`: the data, steps and optimizer of a BEST-RQ pre-training stage."""
  p = ml_collections.ConfigDict()
  # Audio of this dataset (transcripts ignored): a TFDS speech dataset as data.name takes it,
  # or several joined by '+' (a mixture: the audio of each one's train split).
  p.dataset = 'synthetic_speech/source'
  p.num_steps = 2000
  p.learning_rate = 2e-3
  p.warmup_steps = 200
  return p


def demo_fields(c: ml_collections.ConfigDict) -> None:
  """Adds the demo-size BEST-RQ stage to a config of the demo's shape (configs/pretrain.py,
  configs/study.py:ssl), on the audio of the demo's `source` domain. BEST-RQ's quantizer
  (16-dim codes, one codebook), changed from the paper's setting where measured at this size
  (README): a codebook of 256, not 8,192 (nearest-code targets of 30 ms frames are noisy: with
  1,024 codes a frame shares its neighbour's target 12% of the time, with 256 18%), and spans
  of 5 encoder frames (150 ms) starting at 6% of frames, about a quarter of the frames masked
  (with the paper's 1% starts and 300 ms spans, 2,000 steps left the loss at the targets'
  entropy: nothing learned). 3,000 steps fit the 20-minute CPU budget."""
  c.ssl = ssl_fields()
  c.ssl.update(dict(codebook_size=256, code_dim=16, num_codebooks=1, mask_prob=0.06,
                    mask_span=5, noise_std=0.1))
  c.ssl_pretrain = schedule_fields()
  c.ssl_pretrain.update(dict(dataset=c.demo.source, num_steps=3000, learning_rate=1e-3,
                             warmup_steps=300))


def tiny_fields(c: ml_collections.ConfigDict) -> None:
  """The tiny stage of the tests (seconds), after `demo_fields` on the demo's tiny config: a
  small codebook, spans of 3 frames starting at 20% of frames, 12 steps. Batches of 10 and 4
  utterances (3 s and 7 s buckets) are even, so that one device and a batch split over two
  processes train on the same batches (configs/pretrain.py:tiny and configs/study.py:ssl_tiny,
  whose study finds the base the first writes)."""
  c.ssl.update(dict(codebook_size=16, code_dim=4, mask_prob=0.2, mask_span=3))
  c.ssl_pretrain.update(num_steps=12, warmup_steps=2, learning_rate=3e-3)
  c.data.batch_seconds = 30.0


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run config of BEST-RQ pre-training from a config holding `ssl` and `ssl_pretrain`
  sections beside the shared model, features and data fields (the demo's, a study's): every
  weight trains, the head is BEST-RQ's, nothing is validated or evaluated."""
  for section in ('ssl', 'ssl_pretrain'):
    if section not in config:
      raise ConfigError(f'BEST-RQ pre-training needs the config section {section!r} (as '
                        'configs/pretrain.py and configs/study.py:ssl have)')
  c = ml_collections.ConfigDict(config.to_dict())
  p = c.ssl_pretrain
  for section in ('demo', 'study', 'ssl_pretrain'):
    if section in c:
      del c[section]
  if '+' in p.dataset or (c.data.domains_file and p.dataset.startswith('synthetic_speech/')):
    # A mixture (each of its datasets is checked when it is opened) or a domain of the
    # config's own domains file.
    c.data.name = p.dataset
  else:
    presets.apply_data(c, p.dataset)  # named errors for unknown datasets
  presets.apply_method(c, 'full')
  c.head.kind = 'best_rq'
  c.base.path = ''
  c.train.num_steps = int(p.num_steps)
  c.train.eval_every_steps = 0
  c.data.eval_split = ''
  c.optim.learning_rate = float(p.learning_rate)
  c.optim.warmup_steps = int(p.warmup_steps)
  return c
