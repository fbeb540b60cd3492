"""FastConformer import: tiny random transformers ParakeetEncoders / ParakeetForCTC (every
parameter and BatchNorm statistic perturbed), saved as safetensors, converted with the real
converter, compared layer by layer on a padded batch; bad inputs."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from tpa_jax import convert
from tpa_jax.serve import encode

torch = pytest.importorskip('torch', reason='the parity extra (torch, transformers) is not '
                                            'installed: pip install -e .[parity]')
transformers = pytest.importorskip('transformers', reason='the parity extra is not installed')
from safetensors.numpy import load_file, save_file  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            conv_kernel_size=5, subsampling_conv_channels=8, num_mel_bins=16)
VARIANTS = {
    # x8 subsampling, biases, input scaling; a CTC checkpoint (encoder prefix, head left out).
    'ctc_x8_biases': dict(TINY, vocab_size=7),
    # x4, no biases anywhere, no input scaling, 4 heads, exact GELU, another width.
    'encoder_x4_nobias_gelu': dict(TINY, hidden_size=24, num_attention_heads=4,
                                   intermediate_size=40, conv_kernel_size=3,
                                   subsampling_factor=4, subsampling_conv_channels=6,
                                   num_mel_bins=20, attention_bias=False,
                                   convolution_bias=False, scale_input=False, hidden_act='gelu'),
}


def hf_model(seed: int, **overrides):
  """A random ParakeetEncoder (or ParakeetForCTC with vocab_size) in eval mode, every parameter
  and BatchNorm statistic moved away from its initial value."""
  torch.manual_seed(seed)
  vocab = overrides.pop('vocab_size', None)
  encoder_config = transformers.ParakeetEncoderConfig(**overrides)
  if vocab:
    model = transformers.ParakeetForCTC(transformers.ParakeetCTCConfig(
        vocab_size=vocab, pad_token_id=vocab - 1, encoder_config=encoder_config.to_dict()))
  else:
    model = transformers.ParakeetEncoder(encoder_config)
  model.eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(0.3 * torch.randn_like(b))
      elif name.endswith('running_var'):
        b.copy_(torch.rand_like(b) + 0.5)
  return model


def encoder_of(model):
  return model.encoder if hasattr(model, 'ctc_head') else model


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_every_hidden_layer_matches_transformers(variant, tmp_path, mesh1):
  overrides = dict(VARIANTS[variant])
  model = hf_model(seed=len(variant), **overrides)
  model.save_pretrained(str(tmp_path / 'hf'))
  summary = convert.convert('fastconformer', str(tmp_path / 'hf'), str(tmp_path / 'base'))
  assert ('ctc_head.weight' in summary['ignored']) == ('vocab_size' in overrides)
  assert sum('num_batches_tracked' in n for n in summary['ignored']) == overrides[
      'num_hidden_layers']
  encoder = encoder_of(model)
  stats = sum(b.numel() for n, b in encoder.named_buffers() if 'running' in n)
  assert summary['params'] == sum(p.numel() for p in encoder.parameters()) + stats

  rng = np.random.default_rng(0)
  lengths, t, mels = (50, 33, 20), 50, overrides['num_mel_bins']
  mask = np.arange(t)[None, :] < np.array(lengths)[:, None]
  feats = rng.normal(size=(len(lengths), t, mels)).astype(np.float32)
  reference_feats = np.where(mask[..., None], feats, 0)  # the extractor pads with zeros
  with torch.no_grad():
    out = encoder(torch.from_numpy(reference_feats), attention_mask=torch.from_numpy(mask).long(),
                  output_hidden_states=True)
  want = [h.numpy() for h in out.hidden_states]
  want_mask = out.attention_mask.numpy().astype(bool)

  config = convert.default_config()
  assert convert.apply_base_config(config, str(tmp_path / 'base'))
  config.model.scan_layers = False
  ours = encode.load_encoder(config, convert.base_path(str(tmp_path / 'base')), mesh1)
  graphdef, state = nnx.split(ours)

  def run(state, feats, mask):
    encoder = nnx.merge(graphdef, state)
    x, m = encoder.frontend(feats, mask)
    hidden = [x]
    for i in range(encoder.num_blocks):
      hidden.append(encoder.run_blocks(hidden[-1], m, i, i + 1))
    return hidden, m

  # Our padding holds noise: valid frames must not read it.
  with jax.set_mesh(mesh1):
    got, got_mask = jax.jit(run, compiler_options={'xla_backend_optimization_level': 0})(
        state, feats, mask)
  np.testing.assert_array_equal(np.asarray(got_mask), want_mask)
  assert len(got) == len(want) == overrides['num_hidden_layers'] + 1
  for layer, (g, w) in enumerate(zip(got, want)):
    diff = np.abs(np.asarray(g) - w)[want_mask].max()
    assert diff <= 1e-4, f'{variant}: hidden state {layer} differs by {diff}'
    assert np.abs(w[want_mask]).max() > 0.1


def test_converted_base_encodes_audio_as_the_reference(tmp_path):
  """End to end on int16 audio: the converted base's own front end (nemo_log_mel) and encoder
  against ParakeetFeatureExtractor + ParakeetEncoder (features agree within 1e-3, so outputs
  are compared at 1e-3)."""
  model = hf_model(seed=9, **dict(TINY, num_mel_bins=80))
  model.save_pretrained(str(tmp_path / 'hf'))
  convert.convert('fastconformer', str(tmp_path / 'hf'), str(tmp_path / 'base'))
  config = convert.default_config()
  assert convert.apply_base_config(config, str(tmp_path / 'base'))
  assert config.features.kind == 'nemo_log_mel' and config.features.num_mels == 80

  rng = np.random.default_rng(2)
  t = np.arange(9999) / 16000
  audio = 4000 * np.sin(2 * np.pi * 300 * t) * np.sin(2 * np.pi * 3 * t) + rng.normal(0, 200,
                                                                                       t.size)
  audio = audio.astype(np.int16)
  got = encode.encode_audio(config, convert.base_path(str(tmp_path / 'base')), audio)

  inputs = transformers.ParakeetFeatureExtractor()(audio.astype(np.float32) / 32768,
                                                   sampling_rate=16000, return_tensors='pt')
  with torch.no_grad():
    out = model(input_features=inputs['input_features'], attention_mask=inputs['attention_mask'])
  want = out.last_hidden_state[0][out.attention_mask[0].bool()].numpy()
  assert got.shape == want.shape == (8, 32)  # 62 frames of 10 ms, x8
  assert np.abs(got - want).max() <= 1e-3, np.abs(got - want).max()


def test_bad_checkpoints_are_refused_with_every_problem_named(tmp_path):
  model = hf_model(seed=4, **TINY)
  hf_dir = str(tmp_path / 'hf')
  model.save_pretrained(hf_dir)
  config = json.load(open(os.path.join(hf_dir, 'config.json')))
  json.dump(dict(config, num_key_value_heads=1, subsampling_factor=6),
            open(os.path.join(hf_dir, 'config.json'), 'w'))
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('fastconformer', hf_dir, str(tmp_path / 'out'))
  assert 'num_key_value_heads=1 differs from num_attention_heads=2' in str(e.value)
  assert 'subsampling_factor=6 must be a power of 2' in str(e.value)

  json.dump(config, open(os.path.join(hf_dir, 'config.json'), 'w'))
  path = os.path.join(hf_dir, 'model.safetensors')
  tensors = load_file(path)
  del tensors['layers.1.conv.norm.running_var']
  tensors['subsampling.linear.weight'] = np.zeros((32, 15), np.float32)
  tensors['layers.0.self_attn.pos_bias'] = np.zeros((2,), np.float32)
  save_file(tensors, path)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('fastconformer', hf_dir, str(tmp_path / 'out'))
  for line in ('layers.1.conv.norm.running_var: expected shape (32,)',
               'subsampling.linear.weight: expected shape (32, 16), found (32, 15)',
               'layers.0.self_attn.pos_bias: found shape (2,)', 'nothing was written'):
    assert line in str(e.value), str(e.value)
  assert not (tmp_path / 'out').exists()
