"""w2v-BERT 2.0 import: tiny random transformers Wav2Vec2BertModels (every parameter perturbed),
saved as safetensors, converted with the real converter, compared layer by layer on a padded
batch; the command-line converter and encoder end to end; bad inputs."""

import importlib.util
import json
import os
import subprocess
import sys
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpa_jax import convert, sharding
from tpa_jax.convert import w2v_bert
from tpa_jax.serve import encode
from tpa_jax.nn import build
from tpa_jax.train import partition

torch = pytest.importorskip('torch', reason='the parity extra (torch, transformers) is not '
                                            'installed: pip install -e .[parity]')
transformers = pytest.importorskip('transformers', reason='the parity extra is not installed')
from safetensors.numpy import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            feature_projection_input_dim=24, conv_depthwise_kernel_size=5,
            left_max_position_embeddings=4, right_max_position_embeddings=2)
# Several shapes; sequences (20 stacked frames) are longer than left + right, so the distance
# clipping of relative_key attention is exercised on both sides.
VARIANTS = {
    'relative_key': dict(TINY),
    'relative_key_gelu_3x48': dict(TINY, hidden_size=48, num_attention_heads=4,
                                   num_hidden_layers=3, intermediate_size=40,
                                   conv_depthwise_kernel_size=3, left_max_position_embeddings=1,
                                   right_max_position_embeddings=3, hidden_act='gelu',
                                   layer_norm_eps=1e-6),
    'relative_xl': dict(TINY, position_embeddings_type='relative', num_attention_heads=4),
    'no_positions_ctc': dict(TINY, position_embeddings_type=None, vocab_size=7),
}


def hf_model(seed: int, **overrides):
  """A random Wav2Vec2BertModel (or ForCTC with vocab_size) with every parameter moved away
  from its initial value (LayerNorms are not identity, biases not zero)."""
  torch.manual_seed(seed)
  config = transformers.Wav2Vec2BertConfig(**overrides)
  cls = (transformers.Wav2Vec2BertForCTC if overrides.get('vocab_size')
         else transformers.Wav2Vec2BertModel)
  model = cls(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


def save(model, directory):
  model.save_pretrained(str(directory))
  assert {'config.json', 'model.safetensors'} <= set(os.listdir(directory))
  return str(directory)


def hf_hidden_states(model, feats_btf, mask_bt):
  encoder = model.wav2vec2_bert if hasattr(model, 'wav2vec2_bert') else model
  with torch.no_grad():
    out = encoder(torch.from_numpy(feats_btf), attention_mask=torch.from_numpy(mask_bt).long(),
                  output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]  # the encoder input, then each block's output


def our_encoder(base_dir, mesh):
  config = convert.default_config()
  assert convert.apply_base_config(config, base_dir)
  config.model.scan_layers = False  # one block at a time below: nothing to scan
  return encode.load_encoder(config, convert.base_path(base_dir), mesh)


def our_hidden_states(encoder, feats_btf, mask_bt):
  """The frontend output and each block's output (our features: stacked frames unstacked)."""
  b, t, f = feats_btf.shape
  stack = encoder.frontend.stack
  feats = jnp.asarray(feats_btf.reshape(b, t * stack, f // stack))
  mask = jnp.asarray(np.repeat(mask_bt, stack, axis=1))

  graphdef, state = nnx.split(encoder)

  def run(state, feats, mask):
    encoder = nnx.merge(graphdef, state)
    x, m = encoder.frontend(feats, mask)
    out = [x]
    for i in range(encoder.num_blocks):
      out.append(encoder.run_blocks(out[-1], m, i, i + 1))
    return out, m

  # Tiny shapes: XLA's backend optimisations would cost more time than they save.
  hidden, mask_out = jax.jit(run, compiler_options={'xla_backend_optimization_level': 0})(
      state, feats, mask)
  np.testing.assert_array_equal(np.asarray(mask_out), mask_bt)
  return [np.asarray(h) for h in hidden]


def padded_batch(rng, dim, lengths=(20, 13, 7)):
  t = max(lengths)
  feats = rng.normal(size=(len(lengths), t, dim)).astype(np.float32)
  mask = np.arange(t)[None, :] < np.array(lengths)[:, None]
  return feats, mask  # padding holds noise: valid frames must not read it


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_every_hidden_layer_matches_transformers(variant, tmp_path, mesh1):
  overrides = VARIANTS[variant]
  model = hf_model(seed=len(variant), **overrides)
  summary = convert.convert('w2v_bert', save(model, tmp_path / 'hf'), str(tmp_path / 'base'))
  ignored = set(summary['ignored'])
  assert 'masked_spec_embed' in ignored  # pre-training's mask embedding is left out on purpose
  assert ('lm_head.weight' in ignored) == bool(overrides.get('vocab_size'))
  encoder = model.wav2vec2_bert if hasattr(model, 'wav2vec2_bert') else model
  hf_params = sum(p.numel() for n, p in encoder.named_parameters() if n != 'masked_spec_embed')
  assert summary['params'] == hf_params  # every target filled, nothing counted twice

  ours = our_encoder(str(tmp_path / 'base'), mesh1)
  feats, mask = padded_batch(np.random.default_rng(0), overrides['feature_projection_input_dim'])
  want = hf_hidden_states(model, feats, mask)
  with jax.set_mesh(mesh1):
    got = our_hidden_states(ours, feats, mask)
  assert len(got) == len(want) == overrides['num_hidden_layers'] + 1
  for layer, (g, w) in enumerate(zip(got, want)):
    diff = np.abs(g - w)[mask].max()
    assert diff <= 1e-4, f'{variant}: hidden state {layer} differs by {diff}'
    assert np.abs(w[mask]).max() > 0.1


def write_wav(path, samples_int16, rate=16000):
  with wave.open(str(path), 'wb') as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(samples_int16.astype('<i2').tobytes())


def run(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_command_line_convert_and_encode_match_the_reference_end_to_end(tmp_path):
  """launch/convert.py then launch/encode.py on a WAV file vs SeamlessM4TFeatureExtractor +
  Wav2Vec2BertModel: the features differ by up to 1e-3, so the outputs are compared at 1e-3."""
  model = hf_model(seed=3, **dict(TINY, feature_projection_input_dim=160))
  hf_dir = save(model, tmp_path / 'hf')
  result = run('launch/convert.py', '--source=w2v_bert', f'--input={hf_dir}',
               f'--output={tmp_path / "base"}')
  assert result.returncode == 0, result.stderr[-3000:]
  meta = json.load(open(tmp_path / 'base' / 'encoder.json'))
  assert meta['features']['kind'] == 'kaldi_fbank' and meta['model']['frontend']['stack'] == 2
  config = load_config_file('w2v_bert').get_config(f'base={tmp_path / "base"}')
  assert config.model.dim == 32 and config.base.path == str(tmp_path / 'base' / 'encoder')

  rng = np.random.default_rng(5)
  t = np.arange(12345) / 16000
  audio = 3000 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 2 * t) + rng.normal(0, 300,
                                                                                        t.size)
  audio = np.clip(audio, -32768, 32767).astype(np.int16)
  write_wav(tmp_path / 'a.wav', audio)
  result = run('launch/encode.py', f'--base={tmp_path / "base"}', f'--audio={tmp_path / "a.wav"}',
               f'--output={tmp_path / "a.npy"}')
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.load(tmp_path / 'a.npy')

  extractor = transformers.SeamlessM4TFeatureExtractor()
  inputs = extractor(audio.astype(np.float32) / 32768, sampling_rate=16000, return_tensors='pt')
  with torch.no_grad():
    want = model(**inputs).last_hidden_state[0][inputs['attention_mask'][0].bool()].numpy()
  assert got.dtype == np.float32 and got.shape == want.shape == (37, 32)  # 75 fbank frames
  assert np.abs(got - want).max() <= 1e-3, np.abs(got - want).max()


def test_missing_files_are_named(tmp_path):
  (tmp_path / 'notes.txt').write_text('x')
  with pytest.raises(convert.ConversionError, match=r"missing \['config.json', "
                                                    r"'model.safetensors \(or .*notes.txt"):
    convert.convert('w2v_bert', str(tmp_path), str(tmp_path / 'out'))
  with pytest.raises(convert.ConversionError, match=r"--source='nemo': accepted values are "
                                                    r"\['fastconformer', 'w2v_bert'\]"):
    convert.convert('nemo', str(tmp_path), str(tmp_path / 'out'))


def test_unsupported_settings_are_refused(tmp_path):
  hf_dir = save(hf_model(seed=1, **TINY), tmp_path / 'hf')
  config = json.load(open(os.path.join(hf_dir, 'config.json')))
  config.update(position_embeddings_type='rotary', add_adapter=True)
  json.dump(config, open(os.path.join(hf_dir, 'config.json'), 'w'))
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('w2v_bert', hf_dir, str(tmp_path / 'out'))
  assert "position_embeddings_type='rotary' is not supported: accepted values are " \
         "['relative_key', 'relative', None]" in str(e.value)
  assert 'add_adapter=true is not supported' in str(e.value)
  assert not (tmp_path / 'out').exists()


def test_every_bad_tensor_is_listed_and_nothing_is_written(tmp_path):
  hf_dir = save(hf_model(seed=2, **TINY), tmp_path / 'hf')
  path = os.path.join(hf_dir, 'model.safetensors')
  tensors = load_file(path)
  del tensors['encoder.layers.1.conv_module.pointwise_conv2.weight']
  tensors['encoder.layers.0.ffn1.intermediate_dense.weight'] = np.zeros((47, 32), np.float32)
  tensors['encoder.layers.0.self_attn.distance_embedding.weight'] = np.zeros((9, 16), np.float32)
  tensors['encoder.layers.0.self_attn.rotary.weight'] = np.zeros((3,), np.float32)
  tensors['projector.weight'] = np.zeros((4, 32), np.float32)
  save_file(tensors, path)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('w2v_bert', hf_dir, str(tmp_path / 'out'))
  message = str(e.value)
  for line in (
      'encoder.layers.1.conv_module.pointwise_conv2.weight: expected shape (32, 32, 1)',
      'encoder.layers.0.ffn1.intermediate_dense.weight: expected shape (48, 32), found (47, 32)',
      'encoder.layers.0.self_attn.distance_embedding.weight: expected shape (7, 16), '
      'found (9, 16)',
      'encoder.layers.0.self_attn.rotary.weight: found shape (3,)',
      'projector.weight: found shape (4, 32)',
      'nothing was written'):
    assert line in message, message
  assert not (tmp_path / 'out').exists()


def load_config_file(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_file_is_the_converted_w2v_bert_2_0():
  """configs/w2v_bert.py without a base describes what the converter makes of
  Wav2Vec2BertConfig's defaults (facebook/w2v-bert-2.0), down to the parameter count."""
  config = load_config_file('w2v_bert').get_config()
  converted = w2v_bert.tpa_config(transformers.Wav2Vec2BertConfig().to_dict(), None, 'defaults')
  compute_only = ('dtype', 'remat_policy')
  assert ({k: v for k, v in config.model.to_dict().items() if k not in compute_only}
          == {k: v for k, v in converted.model.to_dict().items() if k not in compute_only})
  for key in ('kind', 'num_mels', 'window_ms', 'hop_ms', 'preemphasis', 'floor',
              'sample_rate_hz'):
    assert config.features[key] == converted.features[key], key
  with torch.device('meta'):
    reference = transformers.Wav2Vec2BertModel(transformers.Wav2Vec2BertConfig(mask_time_prob=0))
  config.adapter.placement = 'none'
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, abstract = sharding.abstract_model(lambda: build.build_model(config, seed=0), mesh)
  ours = partition.count_params(nnx.state(nnx.merge(graphdef, abstract).encoder))
  assert ours == sum(p.numel() for p in reference.parameters()) > 5.5e8
