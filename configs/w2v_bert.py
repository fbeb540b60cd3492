"""TPA adapters on w2v-BERT 2.0 (600M parameters, imported from Hugging Face), with a new CTC head
trained on LibriSpeech.

  python launch/convert.py --source=w2v_bert --input=w2v-bert-2.0 --output=runs/w2v_bert/base
  python launch/plan.py --config=configs/w2v_bert.py --devices=8 --accelerator=v5e
  python launch/train.py --config=configs/w2v_bert.py:base=runs/w2v_bert/base \
      --workdir=runs/w2v_bert/tpa

Arguments (comma-separated, all optional): base=DIR, a converted base (its model and features
configs are read from DIR/encoder.json, so fine-tunes and other shapes work too; without it the
model is w2v-BERT 2.0's and base.path is runs/w2v_bert/base/encoder); blocks (adapted blocks,
e.g. 12:24) and bottleneck. Every field is listed, with its meaning, in
tpa_jax/config/fields.py.
"""

import os

from tpa_jax import config as config_lib
from tpa_jax import convert

DEFAULT_BASE = 'runs/w2v_bert/base'


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  known = ('base', 'blocks', 'bottleneck')
  unknown = sorted(set(args) - set(known))
  if unknown:
    raise ValueError(f'unknown config argument(s) {unknown}; accepted: {known}')
  c = config_lib.base_config()

  # w2v-BERT 2.0 as launch/convert.py maps it (facebook/w2v-bert-2.0's config.json).
  c.model.update(dict(dim=1024, num_blocks=24, num_heads=16, ffn_dim=4096, conv_kernel_size=31,
                      conv_causal=True, conv_norm='layer', position='relative_key',
                      left_max_position=64, right_max_position=8, activation='swish',
                      ffn_bias=True, attention_bias=True, conv_bias=False, norm_eps=1e-5,
                      final_norm=False))
  c.model.frontend.update(dict(kind='stacked', input_dim=80, stack=2))
  # Its front end: Kaldi fbank, 80 bins, normalised per bin (SeamlessM4TFeatureExtractor).
  c.features.update(dict(kind='kaldi_fbank', num_mels=80, floor=1.1920929e-07))
  base = args.get('base', DEFAULT_BASE)
  if 'base' in args and not convert.apply_base_config(c, base):
    raise ValueError(f'base={base}: no converted base there (expected {base}/encoder and '
                     f'{base}/encoder.json from launch/convert.py)')
  c.base.path = convert.base_path(base) if os.path.isdir(base) else os.path.join(base, 'encoder')

  # TPU: bf16 compute and frozen weights; the whole block is recomputed in the backward pass.
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'full'
  c.train.frozen_dtype = 'bfloat16'

  # TPA: an adapter beside each of the two FFNs of every block; only adapters and head train.
  config_lib.apply_method(c, 'tpa')
  c.adapter.blocks = args.get('blocks', 'all')
  c.adapter.bottleneck = int(args.get('bottleneck', 256))

  c.head.kind = 'ctc'
  c.tokenizer.update(dict(kind='sentencepiece', vocab_size=256, model_type='unigram'))

  c.data.name = 'librispeech'
  c.data.train_split = 'train_clean100'
  c.data.eval_split = 'test_clean'
  c.data.bucket_seconds = (8.0, 16.0, 32.0)
  c.data.batch_seconds = 512.0  # 16 utterances of 32 s, 64 of 8 s

  c.train.num_steps = 20000
  c.train.log_every_steps = 100
  c.optim.update(dict(learning_rate=1e-3, schedule='cosine', warmup_steps=1000))
  c.checkpoint.every_steps = 1000
  return c
