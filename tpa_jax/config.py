"""Default configuration, model presets and adaptation methods, as ml_collections ConfigDicts.

Config files in `configs/` compose these: `configs/adapt.py:model=tiny,method=tpa,blocks=2:4`.
"""

from __future__ import annotations

import os

import ml_collections

# Domains of the synthetic speech corpus: the full ones, and tiny ones for tests.
DOMAINS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'speech_domains.json')
TINY_DOMAINS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'speech_domains_tiny.json')

# Model shapes by name. `tiny` is for tests, `demo` for `make demo`, `bench` for the step-cost
# benchmark (8 blocks x 256).
MODEL_PRESETS = {
    'tiny': dict(dim=32, num_blocks=4, num_heads=2, ffn_dim=64, conv_kernel_size=5,
                 left_max_position=8, right_max_position=2, frontend=dict(channels=8)),
    'demo': dict(dim=144, num_blocks=8, num_heads=4, ffn_dim=576, conv_kernel_size=15,
                 frontend=dict(channels=64)),
    'bench': dict(dim=256, num_blocks=8, num_heads=4, ffn_dim=1024, conv_kernel_size=15,
                  frontend=dict(channels=64)),
}

# Adaptation methods: which placement carries adapters and which variables train.
METHODS = {
    'full': dict(placement='none', trainable='full'),
    'head': dict(placement='none', trainable='head'),
    'tpa': dict(placement='ff_parallel', trainable='adapters'),
    'ff_parallel': dict(placement='ff_parallel', trainable='adapters'),
    'ff_sequential': dict(placement='ff_sequential', trainable='adapters'),
    'block_parallel': dict(placement='block_parallel', trainable='adapters'),
    'block_sequential': dict(placement='block_sequential', trainable='adapters'),
    'mhsa_parallel': dict(placement='mhsa_parallel', trainable='adapters'),
    'conv_parallel': dict(placement='conv_parallel', trainable='adapters'),
}


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; presets and command-line overrides change these."""
  c = ml_collections.ConfigDict()
  # Seed for weight init and data order.
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.frontend = f = ml_collections.ConfigDict()
  # 'conv2d': 2-D conv subsampling x4 over log-mels; 'stacked': stack frames -> LN -> Linear.
  f.kind = 'conv2d'
  # Feature channels per input frame (mel bins).
  f.input_dim = 80
  # conv2d: output channels of each convolution.
  f.channels = 64
  # conv2d: number of stride-`stride` convolutions (2 x stride 2 = x4 subsampling).
  f.num_layers = 2
  # conv2d: square kernel size of each convolution.
  f.kernel_size = 3
  # conv2d: stride in time and frequency.
  f.stride = 2
  # stacked: consecutive frames concatenated into one (2 x 80 -> 160).
  f.stack = 2
  # Model (residual stream) dimension.
  m.dim = 256
  # Number of conformer blocks.
  m.num_blocks = 8
  # Attention heads; dim must be divisible by it.
  m.num_heads = 4
  # Hidden size of each macaron feed-forward module.
  m.ffn_dim = 1024
  # Depthwise convolution kernel size of the conv module.
  m.conv_kernel_size = 15
  # Causal (left-only) depthwise convolution instead of a symmetric one.
  m.conv_causal = False
  # Norm after the depthwise convolution: 'layer' or 'batch' (frozen statistics).
  m.conv_norm = 'layer'
  # Attention positions: 'relative_key' (Shaw), 'rel_pos' (Transformer-XL) or 'none'.
  m.position = 'relative_key'
  # relative_key: distances are clipped to [-left, right].
  m.left_max_position = 64
  m.right_max_position = 8
  # Activation of the FFN and conv modules: 'swish', 'gelu' (exact), 'gelu_tanh' or 'relu'.
  m.activation = 'swish'
  # Biases in the FFN, attention and conv module projections.
  m.ffn_bias = True
  m.attention_bias = True
  m.conv_bias = True
  # LayerNorm epsilon.
  m.norm_eps = 1e-5
  # An encoder-level LayerNorm after the last block.
  m.final_norm = False
  # Compute dtype ('float32' on CPU tests, 'bfloat16' on TPU); losses and softmax stay float32.
  m.dtype = 'float32'
  # Dtype weights are created in (trainable state is always float32).
  m.param_dtype = 'float32'
  # lax.scan over blocks (False: an unrolled Python loop over the same stacked weights).
  m.scan_layers = True
  # Rematerialisation of each block: 'none', 'full', 'dots', 'dots_no_batch'.
  m.remat_policy = 'none'

  c.adapter = a = ml_collections.ConfigDict()
  # Where adapters sit: 'ff_parallel' (TPA), 'ff_sequential', 'block_parallel',
  # 'block_sequential', 'mhsa_parallel', 'conv_parallel', or 'none'.
  a.placement = 'ff_parallel'
  # Blocks that carry adapters: 'all', a slice such as '4:8', or indices such as '0,3,5'.
  a.blocks = 'all'
  # Bottleneck dimension r of each adapter.
  a.bottleneck = 64
  # Weight of the adapter output in its residual.
  a.residual_weight = 1.0
  # LayerNorm at the adapter input.
  a.use_norm = True
  # Bottleneck activation: 'relu', 'gelu' or 'swish'.
  a.activation = 'relu'
  # Init of the up projection: 'zeros' (the adapted model equals the base at step 0) or 'normal'.
  a.up_init = 'zeros'

  c.head = h = ml_collections.ConfigDict()
  # 'ctc' (per-frame logits, blank id 0) or 'classification' (pooled utterance logits).
  h.kind = 'ctc'
  # CTC: vocabulary size including the blank.
  h.vocab_size = 64
  # classification: number of classes.
  h.num_classes = 4

  c.train = t = ml_collections.ConfigDict()
  # What trains: 'adapters' (adapters + head), 'head', or 'full'.
  t.trainable = 'adapters'
  # Storage dtype of frozen weights: 'bfloat16' or 'float32'.
  t.frozen_dtype = 'bfloat16'
  # Number of optimizer steps.
  t.num_steps = 100
  # Global batch size (utterances per step).
  t.batch_size = 8
  # Log metrics every this many steps.
  t.log_every_steps = 10

  c.optim = o = ml_collections.ConfigDict()
  # Peak learning rate.
  o.learning_rate = 1e-3
  # 'cosine' (warmup then cosine to end_ratio), 'rsqrt' or 'constant'.
  o.schedule = 'cosine'
  # Linear warmup steps.
  o.warmup_steps = 10
  # Final learning rate of the cosine schedule as a fraction of the peak.
  o.end_ratio = 0.0
  # AdamW moments, epsilon and decoupled weight decay (kernels only).
  o.b1 = 0.9
  o.b2 = 0.98
  o.eps = 1e-8
  o.weight_decay = 0.0
  # Global-norm gradient clipping (0 disables).
  o.clip_norm = 1.0

  c.base = b = ml_collections.ConfigDict()
  # A base checkpoint (the frozen encoder, as `checkpoints.save_state` writes it) to adapt; ''
  # initialises the encoder from `seed` (smoke runs and tests).
  b.path = ''

  c.checkpoint = ck = ml_collections.ConfigDict()
  # Save every this many steps (and at the last step, and on SIGTERM) to <workdir>/checkpoints.
  ck.every_steps = 100
  # Newest committed steps kept.
  ck.keep = 3
  # Write in a background thread (arrays are copied off the devices first).
  ck.async_save = True

  c.mesh = ms = ml_collections.ConfigDict()
  # Mesh axis sizes; one may be -1 to take the remaining devices.
  ms.data = -1
  ms.fsdp = 1
  ms.tensor = 1

  c.data = d = ml_collections.ConfigDict()
  # 'random' (random features, the synthetic task of tpa_jax/synthetic.py),
  # 'synthetic_speech/<domain>' (the embedded eSpeak NG corpus: source, target_lang,
  # target_acoustic, lang_id) or 'librispeech' (TFDS's builder; prepare it beforehand).
  d.name = 'random'
  # TFDS data directory ('' : <workdir>/data).
  d.data_dir = ''
  # A JSON file of synthetic corpus domains ('' : tpa_jax/data/speech_domains.json).
  d.domains_file = ''
  # Splits to train and to evaluate on.
  d.train_split = 'train'
  d.eval_split = 'test'
  # Length buckets: upper bounds in seconds; longer utterances are skipped (and counted).
  d.bucket_seconds = (4.0, 8.0, 16.0)
  # Seconds of audio per global batch (batch size of a bucket = this / its length).
  d.batch_seconds = 64.0
  # Label slots per second of audio in a bucket (CTC); longer transcripts are skipped.
  d.max_tokens_per_second = 25.0
  # Utterances per evaluation batch.
  d.eval_batch_size = 32
  # Threads that read and collate batches.
  d.num_threads = 2
  # random: feature frames per utterance.
  d.num_frames = 128
  # random: label tokens per utterance.
  d.num_labels = 8

  c.features = fe = ml_collections.ConfigDict()
  # 'log_mel' (below), or 'kaldi_fbank': Kaldi-compatible fbank (DC offset removal, Povey window,
  # Kaldi mel scale) normalised per bin with the unbiased variance, as w2v-BERT 2.0's
  # SeamlessM4TFeatureExtractor computes it (pair it with model.frontend.kind='stacked').
  fe.kind = 'log_mel'
  # Log-mel filterbanks computed on device from 16 kHz audio.
  fe.sample_rate_hz = 16000
  fe.window_ms = 25.0
  fe.hop_ms = 10.0
  # Mel bins; must equal model.frontend.input_dim.
  fe.num_mels = 80
  fe.preemphasis = 0.97
  # Floor of the mel power before the log (digital silence maps to log(floor)).
  fe.floor = 1e-8
  # SpecAugment in training: frequency bands and time spans set to the mean.
  fe.spec_augment = True
  fe.num_freq_masks = 2
  fe.max_freq_width = 15
  fe.num_time_masks = 2
  # Each time mask spans at most this fraction of the utterance (and max_time_width frames).
  fe.max_time_fraction = 0.05
  fe.max_time_width = 40

  c.decoding = dc = ml_collections.ConfigDict()
  # CTC evaluation: 'greedy' (best path) or 'lexicon' (prefix beam search over the words of the
  # training transcripts, each word scored by a unigram LM of them; host-side, in Python).
  dc.kind = 'greedy'
  # lexicon: score += alpha * log P(word) + beta per word; hypotheses kept per frame; tokens
  # below this log-probability at a frame are not extended; add-k smoothing of word counts.
  dc.alpha = 0.5
  dc.beta = 1.0
  dc.beam_width = 32
  dc.token_min_log_prob = -8.0
  dc.lm_smoothing = 0.5

  c.tokenizer = tk = ml_collections.ConfigDict()
  # 'chars' (the characters of the training transcripts) or 'sentencepiece' (trained on them);
  # cached in <workdir>/tokenizers. Sets head.vocab_size.
  tk.kind = 'chars'
  # sentencepiece: vocabulary size (including the blank) and model type ('unigram' or 'bpe').
  tk.vocab_size = 256
  tk.model_type = 'unigram'
  return c


def parse_arg(arg: str | None) -> dict[str, str]:
  """'model=tiny,method=tpa' -> {'model': 'tiny', 'method': 'tpa'}."""
  out = {}
  for part in filter(None, (arg or '').split(',')):
    if '=' not in part:
      raise ValueError(f'config argument {part!r} is not key=value (in {arg!r})')
    key, value = part.split('=', 1)
    out[key.strip()] = value.strip()
  return out


def adapt_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Base config with a model preset, a method, and adapter overrides from `arg`.

  Keys: model (a preset), method, blocks, bottleneck.
  """
  args = parse_arg(arg)
  known = ('model', 'method', 'blocks', 'bottleneck')
  unknown = sorted(set(args) - set(known))
  if unknown:
    raise ValueError(f'unknown config argument(s) {unknown}; accepted: {known}')
  c = base_config()
  model = args.get('model', 'tiny')
  if model not in MODEL_PRESETS:
    raise ValueError(f'model={model!r}: accepted presets are {tuple(MODEL_PRESETS)}')
  c.model.update_from_flattened_dict(_flatten(MODEL_PRESETS[model]))
  apply_method(c, args.get('method', 'tpa'))
  if 'blocks' in args:
    c.adapter.blocks = args['blocks']
  if 'bottleneck' in args:
    c.adapter.bottleneck = int(args['bottleneck'])
  return c


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
  """Sets the adapter placement and the trainable filter of `method` (a key of METHODS)."""
  if method not in METHODS:
    raise ValueError(f'method={method!r}: accepted methods are {tuple(METHODS)}')
  c.adapter.placement = METHODS[method]['placement']
  c.train.trainable = METHODS[method]['trainable']


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
