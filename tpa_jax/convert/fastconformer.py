"""FastConformer (NVIDIA Parakeet's encoder; Hugging Face `ParakeetEncoder`, or the encoder of
`ParakeetForCTC` / TDT / RNN-T checkpoints) -> the tpa_jax conformer.

The architecture, as transformers' modeling_parakeet.py defines it: x8 depthwise-striding
subsampling (our `dw_striding` frontend; its output scale sqrt(dim) when `scale_input` is folded
into the projection), then blocks of `x += ½FFN1(x); x += MHSA(x); x += Conv(x); x += ½FFN2(x);
x = LN(x)` with pre-norm FFNs (biases iff `attention_bias`), Transformer-XL relative attention
(our `rel_pos`: sinusoidal positions t-1 .. -(t-1), a bias-free position projection, u and v
biases), and a conv module LN -> pointwise -> GLU -> symmetric depthwise -> BatchNorm (running
statistics) -> `hidden_act` -> pointwise, with biases iff `convolution_bias`. No encoder-level
final norm.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from tpa_jax.convert import common

SOURCE = 'fastconformer'
ENCODER_TYPE = 'parakeet_encoder'
# Checkpoints whose config nests the encoder's under `encoder_config`, its tensors under
# `encoder.`.
WRAPPER_TYPES = ('parakeet_ctc', 'parakeet_tdt', 'parakeet_rnnt')
PREFIX = 'encoder.'

# ParakeetEncoderConfig's defaults, for fields a config.json leaves out.
HF_DEFAULTS = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, intermediate_size=4096,
    hidden_act='silu', attention_bias=True, convolution_bias=True, conv_kernel_size=9,
    subsampling_factor=8, subsampling_conv_channels=256, num_mel_bins=80,
    subsampling_conv_kernel_size=3, subsampling_conv_stride=2, scale_input=True)
ACTIVATIONS = {'silu': 'swish', 'swish': 'swish', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
               'gelu_pytorch_tanh': 'gelu_tanh', 'relu': 'relu'}
# Source tensors that a base deliberately leaves out (regular expressions over full names).
IGNORED = {
    r'layers\.\d+\.conv\.norm\.num_batches_tracked': "BatchNorm's update counter (the "
                                                      'statistics are frozen)',
    r'ctc_head\.(weight|bias)': 'the CTC head (a base is the encoder only; adapters train a new '
                                'head)',
    r'(decoder|joint)\..*': 'the transducer decoder and joint network (not part of the encoder)',
}
LN_EPS = 1e-5  # torch's LayerNorm and BatchNorm1d defaults, which ParakeetEncoder uses


def encoder_config(hf: dict, what: str) -> tuple[dict, str]:
  """The encoder's config dict of a ParakeetEncoder or Parakeet{CTC,TDT,RNNT} config, and the
  tensor prefix of its encoder."""
  model_type = hf.get('model_type', ENCODER_TYPE)
  if model_type == ENCODER_TYPE:
    return hf, ''
  if model_type in WRAPPER_TYPES and isinstance(hf.get('encoder_config'), dict):
    return hf['encoder_config'], PREFIX
  raise common.ConversionError(
      f'cannot convert {what}: model_type={model_type!r}; accepted values are '
      f'{[ENCODER_TYPE, *WRAPPER_TYPES]} (the latter with an encoder_config)')


def _hf(hf: dict, key: str):
  return hf.get(key, HF_DEFAULTS[key])


# ParakeetFeatureExtractor's defaults (preprocessor_config.json).
FEATURE_DEFAULTS = dict(sampling_rate=16000, hop_length=160, win_length=400, n_fft=512,
                        preemphasis=0.97)


def tpa_config(hf: dict, preprocessor: dict | None, what: str) -> ml_collections.ConfigDict:
  """The tpa_jax config of a ParakeetEncoderConfig and its feature extractor; refuses what the
  conformer or the front end lacks."""
  d, h = _hf(hf, 'hidden_size'), _hf(hf, 'num_attention_heads')
  problems = []
  if hf.get('num_key_value_heads', h) != h:
    problems.append(f"num_key_value_heads={hf['num_key_value_heads']} differs from "
                    f'num_attention_heads={h} (grouped-query attention is not supported)')
  if d % h or hf.get('head_dim', d // h) != d // h:
    problems.append(f'hidden_size={d} is not num_attention_heads={h} x head_dim')
  if _hf(hf, 'hidden_act') not in ACTIVATIONS:
    problems.append(f"hidden_act={_hf(hf, 'hidden_act')!r} is not supported: accepted values "
                    f'are {list(ACTIVATIONS)}')
  factor = _hf(hf, 'subsampling_factor')
  if factor < 2 or factor & (factor - 1):
    problems.append(f'subsampling_factor={factor} must be a power of 2')
  if _hf(hf, 'conv_kernel_size') % 2 == 0:
    problems.append(f"conv_kernel_size={_hf(hf, 'conv_kernel_size')} must be odd")
  pre = {**FEATURE_DEFAULTS, **(preprocessor or {})}
  mels = pre.get('feature_size', _hf(hf, 'num_mel_bins'))
  if mels != _hf(hf, 'num_mel_bins'):
    problems.append(f"the feature extractor's feature_size={mels} differs from "
                    f"num_mel_bins={_hf(hf, 'num_mel_bins')}")
  if pre['n_fft'] != 1 << (pre['win_length'] - 1).bit_length():
    problems.append(f"n_fft={pre['n_fft']} is not the power of 2 above "
                    f"win_length={pre['win_length']} (the only FFT size supported)")
  if problems:
    raise common.ConversionError(f'cannot convert {what}: ' + '; '.join(problems))
  config = common.default_config()
  m = config.model
  m.dim, m.num_heads = d, h
  m.num_blocks = _hf(hf, 'num_hidden_layers')
  m.ffn_dim = _hf(hf, 'intermediate_size')
  m.conv_kernel_size = _hf(hf, 'conv_kernel_size')
  m.conv_causal, m.conv_norm, m.position = False, 'batch', 'rel_pos'
  m.activation = ACTIVATIONS[_hf(hf, 'hidden_act')]
  m.ffn_bias = m.attention_bias = bool(_hf(hf, 'attention_bias'))
  m.conv_bias = bool(_hf(hf, 'convolution_bias'))
  m.norm_eps, m.final_norm = LN_EPS, False
  f = m.frontend
  f.kind, f.input_dim = 'dw_striding', _hf(hf, 'num_mel_bins')
  f.channels = _hf(hf, 'subsampling_conv_channels')
  f.num_layers = int(math.log2(factor))
  f.kernel_size = _hf(hf, 'subsampling_conv_kernel_size')
  f.stride = _hf(hf, 'subsampling_conv_stride')
  fe, rate = config.features, int(pre['sampling_rate'])
  fe.kind, fe.num_mels, fe.sample_rate_hz = 'nemo_log_mel', f.input_dim, rate
  fe.window_ms = 1000.0 * pre['win_length'] / rate
  fe.hop_ms = 1000.0 * pre['hop_length'] / rate
  fe.preemphasis = float(pre['preemphasis'] or 0.0)
  fe.floor = 2.0 ** -24  # NeMo's log guard, added to the energies
  return config


def _linear(x: np.ndarray) -> np.ndarray:  # torch [out, in] -> [in, out]
  return x.T


def _conv2d(x: np.ndarray) -> np.ndarray:  # torch OIHW (time = H, frequency = W) -> HWIO
  return x.transpose(2, 3, 1, 0)


def rules(hf: dict) -> list[common.Rule]:
  """Every tpa_jax base parameter with the HF tensors it comes from."""
  d, n, h = _hf(hf, 'hidden_size'), _hf(hf, 'num_hidden_layers'), _hf(hf, 'num_attention_heads')
  f, k = _hf(hf, 'intermediate_size'), _hf(hf, 'conv_kernel_size')
  c, sk = _hf(hf, 'subsampling_conv_channels'), _hf(hf, 'subsampling_conv_kernel_size')
  stages = int(math.log2(_hf(hf, 'subsampling_factor')))
  freq = _hf(hf, 'num_mel_bins') // _hf(hf, 'subsampling_conv_stride') ** stages
  hd = d // h
  ffn_bias, conv_bias = bool(_hf(hf, 'attention_bias')), bool(_hf(hf, 'convolution_bias'))
  # ParakeetEncoder multiplies the subsampling output by sqrt(dim): the same as scaling the
  # projection that makes it.
  scale = math.sqrt(d) if _hf(hf, 'scale_input') else 1.0
  rule = common.Rule
  out = [
      rule(('frontend', 'conv_kernel'), ('subsampling.layers.0.weight',), (c, 1, sk, sk),
           _conv2d),
      rule(('frontend', 'conv_bias'), ('subsampling.layers.0.bias',), (c,)),
      rule(('frontend', 'out', 'kernel'), ('subsampling.linear.weight',), (d, c * freq),
           lambda w: w.T * np.float32(scale)),
      rule(('frontend', 'out', 'bias'), ('subsampling.linear.bias',), (d,),
           lambda b: b * np.float32(scale)),
  ]
  # Subsampling modules: conv, ReLU, then (depthwise, pointwise, ReLU) per further stage.
  for i in range(stages - 1):
    dw, pw = 2 + 3 * i, 3 + 3 * i
    out += [
        rule(('frontend', 'depthwise_kernels', i), (f'subsampling.layers.{dw}.weight',),
             (c, 1, sk, sk), _conv2d),
        rule(('frontend', 'depthwise_biases', i), (f'subsampling.layers.{dw}.bias',), (c,)),
        rule(('frontend', 'pointwise_kernels', i), (f'subsampling.layers.{pw}.weight',),
             (c, c, 1, 1), _conv2d),
        rule(('frontend', 'pointwise_biases', i), (f'subsampling.layers.{pw}.bias',), (c,)),
    ]
  layer = 'layers.{}.'

  def add(target, name, shape, transform=common.identity):
    out.append(common.per_layer(('blocks',) + target, layer + name, n, shape, transform))

  def norm(target, name, stats=False):
    add(target + ('scale',), name + '.weight', (d,))
    add(target + ('bias',), name + '.bias', (d,))
    if stats:
      add(target + ('mean',), name + '.running_mean', (d,))
      add(target + ('var',), name + '.running_var', (d,))

  for ours, theirs in (('ffn1', 'feed_forward1'), ('ffn2', 'feed_forward2')):
    norm((ours, 'norm'), f'norm_{theirs}')
    add((ours, 'up', 'kernel'), f'{theirs}.linear1.weight', (f, d), _linear)
    add((ours, 'down', 'kernel'), f'{theirs}.linear2.weight', (d, f), _linear)
    if ffn_bias:
      add((ours, 'up', 'bias'), f'{theirs}.linear1.bias', (f,))
      add((ours, 'down', 'bias'), f'{theirs}.linear2.bias', (d,))
  norm(('attention', 'norm'), 'norm_self_att')
  for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
    add(('attention', ours, 'kernel'), f'self_attn.{theirs}.weight', (d, d),
        lambda w: w.T.reshape(d, h, hd))
    if ffn_bias:
      add(('attention', ours, 'bias'), f'self_attn.{theirs}.bias', (d,),
          lambda b: b.reshape(h, hd))
  add(('attention', 'out', 'kernel'), 'self_attn.o_proj.weight', (d, d),
      lambda w: w.T.reshape(h, hd, d))
  if ffn_bias:
    add(('attention', 'out', 'bias'), 'self_attn.o_proj.bias', (d,))
  add(('attention', 'pos_proj', 'kernel'), 'self_attn.relative_k_proj.weight', (d, d),
      lambda w: w.T.reshape(d, h, hd))
  add(('attention', 'pos_bias_u'), 'self_attn.bias_u', (h, hd))
  add(('attention', 'pos_bias_v'), 'self_attn.bias_v', (h, hd))
  norm(('conv', 'norm_in'), 'norm_conv')
  # GLU: output channels [0, d) are the values, [d, 2d) the gates: our (embed, 2, conv) kernel.
  add(('conv', 'pointwise_in', 'kernel'), 'conv.pointwise_conv1.weight', (2 * d, d, 1),
      lambda w: w[:, :, 0].T.reshape(d, 2, d))
  add(('conv', 'depthwise_kernel'), 'conv.depthwise_conv.weight', (d, 1, k),
      lambda w: w[:, 0, :].T)
  norm(('conv', 'norm_mid'), 'conv.norm', stats=True)
  add(('conv', 'pointwise_out', 'kernel'), 'conv.pointwise_conv2.weight', (d, d, 1),
      lambda w: w[:, :, 0].T)
  if conv_bias:
    add(('conv', 'pointwise_in', 'bias'), 'conv.pointwise_conv1.bias', (2 * d,),
        lambda b: b.reshape(2, d))
    add(('conv', 'depthwise_bias'), 'conv.depthwise_conv.bias', (d,))
    add(('conv', 'pointwise_out', 'bias'), 'conv.pointwise_conv2.bias', (d,))
  norm(('final_norm',), 'norm_out')
  return out


def convert(input_dir: str, output_dir: str) -> dict:
  """Converts the Hugging Face directory `input_dir` into a base in `output_dir`; returns a
  summary. Every problem is reported before anything is written."""
  source = common.HFDirectory(input_dir)
  what = f'{input_dir} (--source={SOURCE})'
  hf, prefix = encoder_config(source.config, what)
  config = tpa_config(hf, source.preprocessor, what)
  return common.convert_directory(source, output_dir, kind=SOURCE, config=config,
                                  plan=rules(hf), ignored=IGNORED, prefix=prefix, what=what)
