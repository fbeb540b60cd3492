"""w2v-BERT 2.0 (Hugging Face `Wav2Vec2BertModel`, or the encoder of `Wav2Vec2BertForCTC`) ->
the tpa_jax conformer.

The architecture, as transformers' modeling_wav2vec2_bert.py defines it: a feature projection
(LayerNorm -> Linear over 2 stacked 80-bin fbank frames), then blocks of
`x += ½FFN1(x); x += MHSA(x); x += Conv(x); x += ½FFN2(x); x = LN(x)` with pre-norm FFNs
(biases, `hidden_act`), Shaw relative-key attention (one distance table per block, distances
clipped to [-left, right], scores scaled by 1/sqrt(d_head)), and a conv module without biases
(LN -> pointwise -> GLU -> causal depthwise -> LN -> `hidden_act` -> pointwise). No encoder-level
final norm. The conv module zeroes padded frames after its first LayerNorm, ours after the GLU:
without biases both give zeros there.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from tpa_jax.convert import common

SOURCE = 'w2v_bert'
MODEL_TYPE = 'wav2vec2-bert'
PREFIX = 'wav2vec2_bert.'  # of Wav2Vec2BertForCTC checkpoints

# Wav2Vec2BertConfig's defaults, for fields a config.json leaves out.
HF_DEFAULTS = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    feature_projection_input_dim=160, hidden_act='swish', layer_norm_eps=1e-5,
    position_embeddings_type='relative_key', left_max_position_embeddings=64,
    right_max_position_embeddings=8, conv_depthwise_kernel_size=31, add_adapter=False,
    use_intermediate_ffn_before_adapter=False)
# SeamlessM4TFeatureExtractor's defaults (preprocessor_config.json).
FEATURE_DEFAULTS = dict(num_mel_bins=80, stride=2, sampling_rate=16000)

POSITIONS = {'relative_key': 'relative_key', 'relative': 'rel_pos', None: 'none'}
ACTIVATIONS = {'swish': 'swish', 'silu': 'swish', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
               'gelu_pytorch_tanh': 'gelu_tanh', 'relu': 'relu'}
# Source tensors that a base deliberately leaves out (regular expressions over full names).
IGNORED = {
    r'masked_spec_embed': 'the masked-frame embedding of pre-training (not used at inference)',
    r'lm_head\.(weight|bias)': 'the CTC head of a fine-tuned checkpoint (a base is the encoder '
                               'only; adapters train a new head)',
}


def _hf(hf: dict, key: str):
  return hf.get(key, HF_DEFAULTS[key])


def check_config(hf: dict, what: str) -> None:
  """Refuses configurations the tpa_jax conformer does not implement, naming each."""
  problems = []
  model_type = hf.get('model_type', MODEL_TYPE)
  if model_type != MODEL_TYPE:
    problems.append(f'model_type={model_type!r}: this converter reads {MODEL_TYPE!r}')
  position = _hf(hf, 'position_embeddings_type')
  if position not in POSITIONS:
    problems.append(f'position_embeddings_type={position!r} is not supported: accepted values '
                    f'are {list(POSITIONS)}')
  act = _hf(hf, 'hidden_act')
  if act not in ACTIVATIONS:
    problems.append(f'hidden_act={act!r} is not supported: accepted values are '
                    f'{list(ACTIVATIONS)}')
  for key in ('add_adapter', 'use_intermediate_ffn_before_adapter'):
    if _hf(hf, key):
      problems.append(f'{key}=true is not supported (the encoder only, without the adapter '
                      'layers after it, is converted)')
  if _hf(hf, 'hidden_size') % _hf(hf, 'num_attention_heads'):
    problems.append(f"hidden_size={_hf(hf, 'hidden_size')} is not divisible by "
                    f"num_attention_heads={_hf(hf, 'num_attention_heads')}")
  if _hf(hf, 'conv_depthwise_kernel_size') % 2 == 0:
    problems.append(f"conv_depthwise_kernel_size={_hf(hf, 'conv_depthwise_kernel_size')} "
                    'must be odd')
  if problems:
    raise common.ConversionError(f'cannot convert {what}: ' + '; '.join(problems))


def tpa_config(hf: dict, preprocessor: dict | None, what: str) -> ml_collections.ConfigDict:
  """The tpa_jax config (model and features) of a Wav2Vec2BertConfig and its extractor."""
  check_config(hf, what)
  pre = {**FEATURE_DEFAULTS, **(preprocessor or {})}
  stack, proj_in = int(pre['stride']), _hf(hf, 'feature_projection_input_dim')
  if proj_in % stack or (preprocessor and proj_in != stack * pre['num_mel_bins']):
    raise common.ConversionError(
        f'cannot convert {what}: feature_projection_input_dim={proj_in} is not stride={stack} '
        f"x num_mel_bins={pre['num_mel_bins']} of the feature extractor")
  config = common.default_config()
  m = config.model
  m.dim = _hf(hf, 'hidden_size')
  m.num_blocks = _hf(hf, 'num_hidden_layers')
  m.num_heads = _hf(hf, 'num_attention_heads')
  m.ffn_dim = _hf(hf, 'intermediate_size')
  m.conv_kernel_size = _hf(hf, 'conv_depthwise_kernel_size')
  m.conv_causal = True
  m.conv_norm = 'layer'
  m.position = POSITIONS[_hf(hf, 'position_embeddings_type')]
  m.left_max_position = _hf(hf, 'left_max_position_embeddings')
  m.right_max_position = _hf(hf, 'right_max_position_embeddings')
  m.activation = ACTIVATIONS[_hf(hf, 'hidden_act')]
  m.ffn_bias, m.attention_bias, m.conv_bias = True, True, False
  m.norm_eps = float(_hf(hf, 'layer_norm_eps'))
  m.final_norm = False
  m.frontend.kind = 'stacked'
  m.frontend.stack = stack
  m.frontend.input_dim = proj_in // stack
  f = config.features
  f.kind = 'kaldi_fbank'
  f.sample_rate_hz = int(pre['sampling_rate'])
  f.window_ms, f.hop_ms, f.preemphasis = 25.0, 10.0, 0.97
  f.num_mels = proj_in // stack
  f.floor = 1.1920929e-07  # float32 epsilon, the extractor's mel floor
  return config


def _linear(x: np.ndarray) -> np.ndarray:  # torch [out, in] -> [in, out]
  return x.T


def rules(hf: dict) -> list[common.Rule]:
  """Every tpa_jax base parameter with the HF tensors it comes from."""
  d, n, h = _hf(hf, 'hidden_size'), _hf(hf, 'num_hidden_layers'), _hf(hf, 'num_attention_heads')
  f, k, proj_in = _hf(hf, 'intermediate_size'), _hf(hf, 'conv_depthwise_kernel_size'), _hf(
      hf, 'feature_projection_input_dim')
  hd = d // h
  position = POSITIONS[_hf(hf, 'position_embeddings_type')]
  out = [
      common.Rule(('frontend', 'norm', 'scale'), ('feature_projection.layer_norm.weight',),
                  (proj_in,)),
      common.Rule(('frontend', 'norm', 'bias'), ('feature_projection.layer_norm.bias',),
                  (proj_in,)),
      common.Rule(('frontend', 'proj', 'kernel'), ('feature_projection.projection.weight',),
                  (d, proj_in), _linear),
      common.Rule(('frontend', 'proj', 'bias'), ('feature_projection.projection.bias',), (d,)),
  ]
  layer = 'encoder.layers.{}.'

  def add(target, name, shape, transform=common.identity):
    out.append(common.per_layer(('blocks',) + target, layer + name, n, shape, transform))

  def norm(target, name):
    add(target + ('scale',), name + '.weight', (d,))
    add(target + ('bias',), name + '.bias', (d,))

  for ffn in ('ffn1', 'ffn2'):
    norm((ffn, 'norm'), f'{ffn}_layer_norm')
    add((ffn, 'up', 'kernel'), f'{ffn}.intermediate_dense.weight', (f, d), _linear)
    add((ffn, 'up', 'bias'), f'{ffn}.intermediate_dense.bias', (f,))
    add((ffn, 'down', 'kernel'), f'{ffn}.output_dense.weight', (d, f), _linear)
    add((ffn, 'down', 'bias'), f'{ffn}.output_dense.bias', (d,))
  norm(('attention', 'norm'), 'self_attn_layer_norm')
  for ours, theirs in (('query', 'linear_q'), ('key', 'linear_k'), ('value', 'linear_v')):
    add(('attention', ours, 'kernel'), f'self_attn.{theirs}.weight', (d, d),
        lambda w: w.T.reshape(d, h, hd))
    add(('attention', ours, 'bias'), f'self_attn.{theirs}.bias', (d,),
        lambda b: b.reshape(h, hd))
  add(('attention', 'out', 'kernel'), 'self_attn.linear_out.weight', (d, d),
      lambda w: w.T.reshape(h, hd, d))
  add(('attention', 'out', 'bias'), 'self_attn.linear_out.bias', (d,))
  if position == 'relative_key':
    left, right = _hf(hf, 'left_max_position_embeddings'), _hf(hf, 'right_max_position_embeddings')
    add(('attention', 'distance_table'), 'self_attn.distance_embedding.weight',
        (left + right + 1, hd))
  elif position == 'rel_pos':
    add(('attention', 'pos_proj', 'kernel'), 'self_attn.linear_pos.weight', (d, d),
        lambda w: w.T.reshape(d, h, hd))
    add(('attention', 'pos_bias_u'), 'self_attn.pos_bias_u', (h, hd))
    add(('attention', 'pos_bias_v'), 'self_attn.pos_bias_v', (h, hd))
  norm(('conv', 'norm_in'), 'conv_module.layer_norm')
  # GLU: output channels [0, d) are the values, [d, 2d) the gates: our (embed, 2, conv) kernel.
  add(('conv', 'pointwise_in', 'kernel'), 'conv_module.pointwise_conv1.weight', (2 * d, d, 1),
      lambda w: w[:, :, 0].T.reshape(d, 2, d))
  add(('conv', 'depthwise_kernel'), 'conv_module.depthwise_conv.weight', (d, 1, k),
      lambda w: w[:, 0, :].T)
  norm(('conv', 'norm_mid'), 'conv_module.depthwise_layer_norm')
  add(('conv', 'pointwise_out', 'kernel'), 'conv_module.pointwise_conv2.weight', (d, d, 1),
      lambda w: w[:, :, 0].T)
  norm(('final_norm',), 'final_layer_norm')
  return out


def convert(input_dir: str, output_dir: str) -> dict:
  """Converts the Hugging Face directory `input_dir` into a base in `output_dir`; returns a
  summary. Every problem is reported before anything is written."""
  source = common.HFDirectory(input_dir)
  what = f'{input_dir} (--source={SOURCE})'
  config = tpa_config(source.config, source.preprocessor, what)
  return common.convert_directory(source, output_dir, kind=SOURCE, config=config,
                                  plan=rules(source.config), ignored=IGNORED, prefix=PREFIX,
                                  what=what)
