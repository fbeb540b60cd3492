"""Default configuration, model presets and adaptation methods, as ml_collections ConfigDicts.

Config files in `configs/` compose these: `configs/adapt.py:model=tiny,method=tpa,blocks=2:4`.
"""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections

# Domains of the synthetic speech corpus: the full ones, and tiny ones for tests.
DOMAINS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'speech_domains.json')
TINY_DOMAINS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'speech_domains_tiny.json')

# Settings of the giant presets, which target TPUs: bf16 compute and every block rematerialised
# (only block inputs are kept for the backward pass), so activations of a per-device micro-batch
# of 8 x 30 s fit beside the weights.
_GIANT = dict(dtype='bfloat16', remat_policy='full')

# Model shapes by name. `tiny` is for tests, `demo` for `make demo`, `bench` for the step-cost
# benchmark (8 blocks x 256). The giant ones take the shapes of published encoders; the counts
# are of tpa_jax's conformer (4x FFNs, GLU conv module, biases, 64-token CTC head), from
# abstract shapes (`tpa_jax.costs.abstract_param_count`; tests keep each within 10% of its name).
MODEL_PRESETS = {
    'tiny': dict(dim=32, num_blocks=4, num_heads=2, ffn_dim=64, conv_kernel_size=5,
                 left_max_position=8, right_max_position=2, frontend=dict(channels=8)),
    'demo': dict(dim=144, num_blocks=8, num_heads=4, ffn_dim=576, conv_kernel_size=15,
                 frontend=dict(channels=64)),
    'bench': dict(dim=256, num_blocks=8, num_heads=4, ffn_dim=1024, conv_kernel_size=15,
                  frontend=dict(channels=64)),
    # w2v-BERT 2.0 (Seamless, 2023: facebook/w2v-bert-2.0's config) and BEST-RQ 0.6B share 24
    # blocks x 1024; w2v-BERT 2.0's details: 16 heads, FFN 4096, depthwise kernel 31, Shaw
    # relative keys in [-64, 8], 2 x 80 stacked filterbank frames (20 ms). 0.581 B parameters.
    '600m': dict(dim=1024, num_blocks=24, num_heads=16, ffn_dim=4096, conv_kernel_size=31,
                 left_max_position=64, right_max_position=8,
                 frontend=dict(kind='stacked', stack=2), **_GIANT),
    # USM (Google USM, Zhang et al. 2023, arXiv 2303.01037: a 2B-parameter conformer of 32
    # blocks x 1536), with lingvo's conformer details: 16 heads, FFN 4 x 1536, depthwise kernel 5,
    # Transformer-XL relative positions, conv2d x4 subsampling (40 ms). 1.818 B parameters.
    '2b': dict(dim=1536, num_blocks=32, num_heads=16, ffn_dim=6144, conv_kernel_size=5,
               position='rel_pos', frontend=dict(kind='conv2d', channels=128), **_GIANT),
    # BigSSL's Conformer G (Zhang et al. 2021, arXiv 2109.13226: 8B parameters, 36 blocks x
    # 3072, 16 heads, depthwise kernel 5), FFN 4 x 3072, Transformer-XL relative positions,
    # conv2d x4 subsampling. 8.166 B parameters.
    '8b': dict(dim=3072, num_blocks=36, num_heads=16, ffn_dim=12288, conv_kernel_size=5,
               position='rel_pos', frontend=dict(kind='conv2d', channels=128), **_GIANT),
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
  # Global batch size (utterances per optimizer step).
  t.batch_size = 8
  # Micro-batches per optimizer step: the batch is split into this many, their gradients are
  # accumulated (weighted as one batch: by CTC tokens or utterances) before one update.
  # batch_size must be a multiple of grad_accum_steps x the data-parallel mesh axes.
  t.grad_accum_steps = 1
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
  # 'log_mel' (below); 'kaldi_fbank': Kaldi-compatible fbank (DC offset removal, Povey window,
  # Kaldi mel scale) normalised per bin with the unbiased variance, as w2v-BERT 2.0's
  # SeamlessM4TFeatureExtractor computes it (pair it with model.frontend.kind='stacked');
  # 'nemo_log_mel': FastConformer's (NeMo's centred, Slaney-mel log-mel; floor = 2**-24).
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


# Keys of the `configs/adapt.py` argument string.
ADAPT_KEYS = ('model', 'method', 'blocks', 'bottleneck', 'data')
# `data=` values besides 'synthetic_speech/<domain>'.
DATA_NAMES = ('random', 'librispeech')


def adapt_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Base config with a model preset, a method, adapter overrides and a dataset from `arg`.

  Keys: model (a preset), method, blocks (adapted blocks), bottleneck, data ('random',
  'librispeech' or 'synthetic_speech/<domain>').
  """
  args = parse_arg(arg)
  unknown = sorted(set(args) - set(ADAPT_KEYS))
  if unknown:
    raise ValueError(f'unknown config argument(s) {unknown} in {arg!r}; accepted: {ADAPT_KEYS}')
  c = base_config()
  model = args.get('model', 'tiny')
  if model not in MODEL_PRESETS:
    raise ValueError(f'model={model!r}: accepted presets are {tuple(MODEL_PRESETS)}')
  c.model.update_from_flattened_dict(_flatten(MODEL_PRESETS[model]))
  method = args.get('method', 'tpa')
  apply_method(c, method)
  if ('blocks' in args or 'bottleneck' in args) and c.adapter.placement == 'none':
    with_adapters = tuple(m for m, v in METHODS.items() if v['placement'] != 'none')
    raise ValueError(f'blocks= and bottleneck= select adapters, and method={method!r} has none; '
                     f'accepted with: {with_adapters}')
  if 'blocks' in args:
    # Imported here: config files stay importable without jax until a selection is checked.
    from tpa_jax.nn import adapters  # pylint: disable=import-outside-toplevel
    adapters.parse_blocks(args['blocks'], c.model.num_blocks)  # a named error if out of range
    c.adapter.blocks = args['blocks']
  if 'bottleneck' in args:
    c.adapter.bottleneck = _positive_int('bottleneck', args['bottleneck'])
  if 'data' in args:
    apply_data(c, args['data'])
  return c


def apply_data(c: ml_collections.ConfigDict, name: str) -> None:
  """Points `c.data` at a dataset: 'random', 'librispeech' (train-clean-100 / test-clean) or
  'synthetic_speech/<domain>' with a domain of the embedded corpus."""
  family, _, domain = name.partition('/')
  if family == 'synthetic_speech':
    domains = synthetic_domains()
    if domain not in domains:
      raise ValueError(f'data={name!r}: accepted synthetic_speech domains are {domains} (a '
                       'domain of your own: --config.data.name and --config.data.domains_file)')
    c.data.name = name
    if domain.endswith('_tiny'):
      c.data.domains_file = TINY_DOMAINS_FILE
    return
  if name not in DATA_NAMES:
    raise ValueError(f"data={name!r}: accepted values are {DATA_NAMES} or "
                     f"'synthetic_speech/<domain>' with a domain in {synthetic_domains()}")
  c.data.name = name
  if name == 'librispeech':
    c.data.train_split = 'train_clean100'
    c.data.eval_split = 'test_clean'
    # LibriSpeech utterances last up to ~35 s.
    c.data.bucket_seconds = (8.0, 16.0, 24.0, 36.0)


def synthetic_domains() -> tuple[str, ...]:
  """Domain names of the embedded synthetic corpus (full and tiny)."""
  names = []
  for path in (DOMAINS_FILE, TINY_DOMAINS_FILE):
    with open(path) as f:
      names.extend(json.load(f))
  return tuple(names)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of 'configs/x.py[:arg]', as `--config=` loads it (`get_config(arg)`)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_config_file', path)
  if module_spec is None or not os.path.isfile(path):
    raise ValueError(f'--config={spec!r}: no config file {path!r}')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def check_overrides(config: ml_collections.ConfigDict, argv: list[str],
                    flag: str = 'config') -> None:
  """Raises a ValueError naming the first `--config.a.b=...` of `argv` whose field `config`
  lacks, with the fields accepted at that level (config_flags reports only the missing key)."""
  prefix = f'--{flag}.'
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split('=', 1)[0]
    node = config
    parts = path.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join([flag, *parts[:i]])
        accepted = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f'--{flag}.{path}: {where} has no field {part!r}; accepted fields of '
                         f'{where}: {accepted}')
      node = node[part]


def _positive_int(key: str, value: str) -> int:
  try:
    number = int(value)
  except ValueError:
    number = 0
  if number < 1:
    raise ValueError(f'{key}={value!r}: accepted values are positive integers')
  return number


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
