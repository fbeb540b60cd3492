"""`make demo`: pre-train a small conformer on synthetic English, then adapt it to Spanish with TPA.

  python launch/demo.py --config=configs/demo.py --workdir=runs/demo
  python launch/demo.py --config=configs/demo.py:tiny --workdir=/tmp/demo   # seconds, for tests

Characters as CTC tokens, 30 ms encoder frames (3 stacked 10 ms log-mel frames). Every field is
listed, with its meaning, in tpa_jax/config/fields.py; `demo` holds the two stages.
"""

import ml_collections

from tpa_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.model.update(dict(dim=144, num_blocks=6, num_heads=4, ffn_dim=576, conv_kernel_size=15,
                      left_max_position=32, right_max_position=8))
  c.model.frontend.kind = 'stacked'
  c.model.frontend.stack = 3
  c.train.frozen_dtype = 'float32'  # CPU: bf16 storage would only add casts
  c.train.log_every_steps = 50
  c.optim.schedule = 'cosine'
  c.optim.b2 = 0.98
  c.tokenizer.kind = 'chars'
  # Runs this short underfit rather than overfit, so SpecAugment (a regulariser) is off.
  c.features.spec_augment = False
  # Closed-vocabulary decoding: the words of each domain's training transcripts, unigram LM.
  # alpha, beta, beam and pruning chosen on the source validation split (not on test).
  c.decoding.update(dict(kind='lexicon', alpha=0.5, beta=-0.5, beam_width=64,
                         token_min_log_prob=-5.0))
  c.data.bucket_seconds = (2.0, 3.0, 4.0, 5.0, 6.5)
  # 16 s of audio per step: twice the updates of 32 s batches for the same audio (measured:
  # 2000 x 16 s beat 1000 x 32 s, 41.6% vs 45.5% best-path source WER, for 20% more time).
  c.data.batch_seconds = 16.0
  c.data.eval_batch_size = 64

  c.demo = d = ml_collections.ConfigDict()
  d.source = 'synthetic_speech/source'
  d.target = 'synthetic_speech/target_lang'
  # Pre-training: every weight trains.
  d.pretrain = ml_collections.ConfigDict(dict(
      method='full', num_steps=2300, learning_rate=3e-3, warmup_steps=150))
  # Adaptation: the base is frozen; TPA adapters and a new CTC head train.
  d.adapt = ml_collections.ConfigDict(dict(
      method='tpa', bottleneck=32, num_steps=250, learning_rate=3e-3, warmup_steps=50))

  if arg == 'tiny':  # the same pipeline in seconds (tests): a tiny corpus and model
    c.model.update(dict(dim=32, num_blocks=2, num_heads=2, ffn_dim=64, conv_kernel_size=5))
    c.data.domains_file = config_lib.TINY_DOMAINS_FILE
    d.source, d.target = d.source + '_tiny', d.target + '_tiny'
    c.data.bucket_seconds = (3.0, 7.0)
    c.data.batch_seconds = 24.0
    c.data.eval_batch_size = 8
    c.train.log_every_steps = 5
    d.pretrain.update(num_steps=10, warmup_steps=2)
    d.adapt.update(num_steps=10, warmup_steps=2, bottleneck=8)
  elif arg:
    raise ValueError(f"configs/demo.py takes no argument or 'tiny', got {arg!r}")
  return c
