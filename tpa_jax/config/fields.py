"""Every config field with its default and meaning, one function per section.

`base_config()` assembles the sections; presets (`presets.py`) and command-line overrides
(`--config.section.field=value`) change their values.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; presets and command-line overrides change these."""
  c = ml_collections.ConfigDict()
  # Seed for weight init and data order.
  c.seed = 0
  c.model = model_fields()
  c.adapter = adapter_fields()
  c.head = head_fields()
  c.train = train_fields()
  c.optim = optim_fields()
  c.base = base_fields()
  c.checkpoint = checkpoint_fields()
  c.mesh = mesh_fields()
  c.data = data_fields()
  c.features = features_fields()
  c.decoding = decoding_fields()
  c.tokenizer = tokenizer_fields()
  return c


def frontend_fields() -> ml_collections.ConfigDict:
  """The subsampling frontend between the features and the first block."""
  f = ml_collections.ConfigDict()
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
  return f


def model_fields() -> ml_collections.ConfigDict:
  """The conformer encoder: shape, attention positions, activations, dtypes, layer loop."""
  m = ml_collections.ConfigDict()
  m.frontend = frontend_fields()
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
  # Attention implementation: 'xla' (scores materialised, the reference), 'chunked' (blockwise
  # online softmax, no [B, H, T, T] array in the forward or backward pass) or 'auto'.
  m.attention_impl = 'xla'
  # Key and query block (frames) of the chunked attention.
  m.attention_block = 128
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
  return m


def adapter_fields() -> ml_collections.ConfigDict:
  """Residual adapters: placement, adapted blocks, bottleneck, residual weight, norm, inits."""
  a = ml_collections.ConfigDict()
  # Where adapters sit: 'ff_parallel' (TPA), 'ff_sequential', 'block_parallel',
  # 'block_sequential', 'mhsa_parallel', 'conv_parallel', 'lora' (low-rank updates of the
  # block's projections, tpa_jax/nn/lora.py), or 'none'.
  a.placement = 'ff_parallel'
  # Blocks that carry adapters: 'all', a slice such as '4:8', or indices such as '0,3,5'.
  a.blocks = 'all'
  # Bottleneck dimension r of each adapter (lora: the rank of each update).
  a.bottleneck = 64
  # Weight of the adapter output in its residual.
  a.residual_weight = 1.0
  # LayerNorm at the adapter input.
  a.use_norm = True
  # Bottleneck activation: 'relu', 'gelu' or 'swish'.
  a.activation = 'relu'
  # Init of the up projection: 'zeros' (the adapted model equals the base at step 0) or 'normal'.
  a.up_init = 'zeros'
  # lora: updates are scaled by lora_alpha / rank; the projections they adapt: q, k, v, out,
  # ffn1_up, ffn1_down, ffn2_up, ffn2_down, or the groups attention, ffn1, ffn2.
  a.lora_alpha = 8.0
  a.lora_targets = 'q,k,v,out,ffn1,ffn2'
  return a


def head_fields() -> ml_collections.ConfigDict:
  """The task head: CTC over a vocabulary, or utterance classification."""
  h = ml_collections.ConfigDict()
  # 'ctc' (per-frame logits, blank id 0) or 'classification' (pooled utterance logits).
  h.kind = 'ctc'
  # CTC: vocabulary size including the blank.
  h.vocab_size = 64
  # classification: number of classes.
  h.num_classes = 4
  return h


def train_fields() -> ml_collections.ConfigDict:
  """What trains, storage dtype of the frozen weights, steps, batch, accumulation, logging."""
  t = ml_collections.ConfigDict()
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
  # Score data.validation_split every this many steps and at the last (0: never), keep the best
  # step's state in <workdir>/best, and score data.eval_split once, with that state.
  t.eval_every_steps = 0
  # Decoding of those validation scores: 'greedy' (best path: cheap, the default) or 'config'
  # (the decoding section's, e.g. the lexicon decoder).
  t.validation_decoding = 'greedy'
  return t


def optim_fields() -> ml_collections.ConfigDict:
  """AdamW with warmup and a decay schedule, clipping."""
  o = ml_collections.ConfigDict()
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
  return o


def base_fields() -> ml_collections.ConfigDict:
  """The frozen base the run adapts."""
  b = ml_collections.ConfigDict()
  # A base checkpoint (the frozen encoder, as `checkpoint.save_state` writes it) to adapt; ''
  # initialises the encoder from `seed` (smoke runs and tests).
  b.path = ''
  return b


def checkpoint_fields() -> ml_collections.ConfigDict:
  """Run checkpoints in <workdir>/checkpoints."""
  ck = ml_collections.ConfigDict()
  # Save every this many steps (and at the last step, and on SIGTERM) to <workdir>/checkpoints.
  ck.every_steps = 100
  # Newest committed steps kept.
  ck.keep = 3
  # Write in a background thread (arrays are copied off the devices first).
  ck.async_save = True
  return ck


def mesh_fields() -> ml_collections.ConfigDict:
  """The device mesh (data, fsdp, tensor)."""
  ms = ml_collections.ConfigDict()
  # Mesh axis sizes; one may be -1 to take the remaining devices.
  ms.data = -1
  ms.fsdp = 1
  ms.tensor = 1
  return ms


def data_fields() -> ml_collections.ConfigDict:
  """The dataset, its splits, length buckets and batches."""
  d = ml_collections.ConfigDict()
  # 'random' (random features, the synthetic task of tpa_jax/random_task.py),
  # 'synthetic_speech/<domain>' (the embedded eSpeak NG corpus: source, target_lang,
  # target_acoustic, lang_id), 'librispeech' (TFDS's builder; prepare it beforehand) or
  # 'manifest:DIR' (NeMo manifests DIR/{train,validation,test}.jsonl: tpa_jax/data/manifest.py).
  d.name = 'random'
  # TFDS data directory ('' : <workdir>/data).
  d.data_dir = ''
  # A JSON file of synthetic corpus domains ('' : tpa_jax/data/speech_domains.json).
  d.domains_file = ''
  # Text normalisation of transcripts (training text, references, decoder word counts alike):
  # 'none', 'lower', 'lower_no_punctuation'.
  d.text_normalization = 'none'
  # Splits to train and to evaluate on.
  d.train_split = 'train'
  d.eval_split = 'test'
  # Split scored during training (train.eval_every_steps) to choose the best step.
  d.validation_split = 'validation'
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
  return d


def features_fields() -> ml_collections.ConfigDict:
  """The front end computed on device from 16 kHz audio, and SpecAugment."""
  fe = ml_collections.ConfigDict()
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
  return fe


def decoding_fields() -> ml_collections.ConfigDict:
  """CTC decoding for scoring."""
  dc = ml_collections.ConfigDict()
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
  return dc


def tokenizer_fields() -> ml_collections.ConfigDict:
  """CTC tokens: characters or SentencePiece."""
  tk = ml_collections.ConfigDict()
  # 'chars' (the characters of the training transcripts) or 'sentencepiece' (trained on them);
  # cached in <workdir>/tokenizers. Sets head.vocab_size.
  tk.kind = 'chars'
  # sentencepiece: vocabulary size (including the blank) and model type ('unigram' or 'bpe').
  tk.vocab_size = 256
  tk.model_type = 'unigram'
  # Where tokenizers are cached ('': <workdir>/tokenizers); runs that share one point here.
  tk.dir = ''
  # A tokenizer file to use instead of training one (a base's own: its head's vocabulary).
  tk.file = ''
  return tk
