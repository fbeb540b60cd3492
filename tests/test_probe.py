"""Layer probes: linear read-outs find the layer that holds a label or a transcript and nothing
in noise; hidden states are the encoder's own layers; launch/probe.py writes a table per task
with every base and layer, and a re-run trains only the bases it has not probed."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import ctc_batch, host_arrays, tiny_config
from tpa_jax import checkpoint
from tpa_jax.config.files import load_config_file
from tpa_jax.data.tokenizer import CharTokenizer
from tpa_jax.errors import ConfigError
from tpa_jax.eval import probes
from tpa_jax.nn import build
from tpa_jax.study import probe as probe_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _standardized(x, axis):
  flat = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1, x.shape[-1])
  flat = flat.astype(np.float64)
  sums, squares = flat.sum(1), (flat ** 2).sum(1)
  return probes.Standardizer.fit(sums, squares, flat.shape[1])(x, axis=axis)


def test_classification_probe_finds_the_layer_that_holds_the_label():
  rng = np.random.default_rng(0)
  classes, dim = 4, 16
  centers = rng.normal(size=(classes, dim)) * 2.0

  def split(n):
    y = rng.integers(0, classes, n)
    noise = rng.normal(size=(n, dim))
    # Layer 0: noise alone; layer 1: the class centre plus noise; layer 2: the same, scaled by
    # 50 and shifted (standardisation must make it as readable as layer 1).
    x = np.stack([rng.normal(size=(n, dim)), centers[y] + noise,
                  50.0 * (centers[y] + noise) + 7.0], axis=1)
    return x.astype(np.float32), y

  (xtr, ytr), (xva, yva), (xte, yte) = split(400), split(200), split(200)
  stats = (xtr.sum(0).astype(np.float64), (xtr.astype(np.float64) ** 2).sum(0), len(xtr))
  scale = probes.Standardizer.fit(*stats)
  probe = probes.ClassificationProbe(3, dim, classes, [1e-3, 1e-1])
  losses = probe.fit(scale(xtr, axis=1), ytr, 150)
  assert losses[-1] < losses[0]
  scores = probe.scores((scale(xva, axis=1), yva), (scale(xte, axis=1), yte))
  assert [s['layer'] for s in scores] == [0, 1, 2]
  assert scores[0]['test'] < 0.45  # chance is 0.25
  assert scores[1]['test'] > 0.9 and scores[2]['test'] > 0.9
  for s in scores:  # the chosen rate is the one with the best validation accuracy
    assert s['validation'] == max(s['validation_by_rate'])
    assert s['learning_rate'] == [1e-3, 1e-1][int(np.argmax(s['validation_by_rate']))]


def _ctc_batches(rng, n_batches, tokenizer, dim):
  """Utterances of 3-5 random letters, each letter 2 frames then a blank frame. Layer 1 is the
  frame's token one-hot plus noise; layer 0 is noise."""
  out = []
  for _ in range(n_batches):
    b, t, u = 8, 16, 5
    frames = rng.normal(size=(2, b, t, dim)).astype(np.float32)
    mask = np.zeros((b, t), bool)
    labels = np.zeros((b, u), np.int32)
    label_mask = np.zeros((b, u), bool)
    texts = []
    for i in range(b):
      ids = list(rng.integers(1, tokenizer.vocab_size, rng.integers(3, u + 1)))
      per_frame = []
      for token in ids:
        per_frame += [token, token, 0]
      onehot = np.eye(dim, dtype=np.float32)[per_frame]
      frames[1, i, :len(per_frame)] = 3.0 * onehot + 0.3 * rng.normal(size=onehot.shape)
      mask[i, :len(per_frame)] = True
      labels[i, :len(ids)], label_mask[i, :len(ids)] = ids, True
      texts.append(tokenizer.decode(ids))
    out.append(probes.CTCBatch(frames, mask, labels, label_mask, texts))
  return out


def test_ctc_probe_reads_the_transcript_from_the_layer_that_holds_it():
  rng = np.random.default_rng(1)
  tokenizer, dim = CharTokenizer('abcd'), 8
  train = _ctc_batches(rng, 6, tokenizer, dim)
  validation, test = _ctc_batches(rng, 2, tokenizer, dim), _ctc_batches(rng, 2, tokenizer, dim)
  probe = probes.CTCProbe(2, dim, tokenizer.vocab_size, [1e-3, 1e-1])
  losses = probe.fit(train, 150)
  assert len(losses) == 150 and losses[-1] < losses[0]
  scores = probe.scores(validation, test, tokenizer)
  assert scores[1]['test'] < 0.1, scores  # CER of the layer that holds the tokens
  assert scores[0]['test'] > 0.5, scores  # noise
  assert scores[1]['learning_rate'] == 1e-1  # 150 steps at 1e-3 barely move the weights
  assert all(s['validation'] == min(s['validation_by_rate']) for s in scores)


def test_standardizer_gives_each_layer_zero_mean_unit_variance():
  rng = np.random.default_rng(2)
  x = np.stack([rng.normal(3.0, 5.0, (500, 6)), rng.normal(-1.0, 0.1, (500, 6))], axis=1)
  z = _standardized(x.astype(np.float32), axis=1)
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)


def test_hidden_states_are_the_frontend_then_every_block(mesh1):
  config = tiny_config('head', **{'model.final_norm': True})
  model = build.create_model(config, mesh1)
  batch = ctc_batch(config)
  features, mask = jnp.asarray(batch['features']), jnp.asarray(batch['feature_mask'])
  with jax.set_mesh(mesh1):
    layers, out_mask = nnx.jit(lambda m, f, k: m.encoder.hidden_states(f, k))(
        model, features, mask)
    last, last_mask = nnx.jit(lambda m, f, k: m.encode(f, k))(model, features, mask)
    first, _ = nnx.jit(lambda m, f, k: m.encoder.frontend(f, k))(model, features, mask)
    top = nnx.jit(lambda m, x: m.encoder.finish(x))(model, layers[-1])
  assert len(layers) == config.model.num_blocks + 1
  np.testing.assert_array_equal(np.asarray(out_mask), np.asarray(last_mask))
  np.testing.assert_allclose(np.asarray(layers[0]), np.asarray(first), rtol=1e-6, atol=1e-6)
  # The top layer is the encoder's output before the final norm.
  np.testing.assert_allclose(np.asarray(top), np.asarray(last), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(layers[1]), np.asarray(layers[2]))


def test_bases_are_parsed_with_named_errors():
  assert probe_lib.parse_bases('random, best_rq@1500,mine=/x/encoder') == [
      ('random', ''), ('best_rq@1500', ''), ('mine', '/x/encoder')]
  for bad, named in (('randm', 'accepted forms'), ('best_rq@0', 'positive'),
                     ('random,random', 'twice'), ('', 'no base'), ('x=', 'needs both')):
    with pytest.raises(ConfigError, match=named):
      probe_lib.parse_bases(bad)


def _probe_config():
  return load_config_file(os.path.join(ROOT, 'configs', 'probe.py') + ':tiny')


def test_probe_fields_get_named_errors_before_anything_runs(tmp_path):
  for field, value, named in (('learning_rates', '1e-2,x', 'probe.learning_rates'),
                              ('num_steps', 0, 'probe.num_steps'),
                              ('tasks', 'synthetic_speech/nowhere', 'probe.tasks')):
    config = _probe_config()
    config.probe[field] = value
    with pytest.raises(ConfigError, match=named):
      probe_lib.run(config, str(tmp_path / 'w'))
    assert not os.path.exists(tmp_path / 'w' / 'bases')  # no base was written


def test_the_best_layer_is_chosen_on_validation_not_test():
  # Validation and test disagree on both tasks: test would choose the other layer.
  layers = [{'layer': 0, 'validation': 0.6, 'test': 0.5, 'test_wer': 0.9},
            {'layer': 1, 'validation': 0.9, 'test': 0.4, 'test_wer': 0.8}]
  results = {'num_steps': 1, 'learning_rates': [0.1], 'tasks': {
      'asr': {'b': {'metric': 'cer', 'layers': layers}},  # CER: lower is better
      'lid': {'b': {'metric': 'accuracy', 'layers': [dict(r) for r in layers]}}}}
  table = probe_lib.table(results)
  asr, lid = table.split('## lid')
  assert '| b | **50.0** | 40.0 | 0 |' in asr  # the lower validation CER
  assert '| b | 50.0 | **40.0** | 1 |' in lid  # the higher validation accuracy


def test_the_cache_key_follows_the_weights_data_and_tokenizer():
  config = _probe_config()
  config.study.tasks = 'synthetic_speech/target_lang_tiny'
  task = probe_lib.cells_lib.parse_tasks(config)[0]
  key = lambda c, fp='a', tok=CharTokenizer('ab'), data='d': probe_lib.cache_key(
      c, task, fp, [0.1], tok, data)
  base = key(config)
  assert json.loads(json.dumps(base)) == base  # equal to itself read back from the cache
  other = ml_collections.ConfigDict(config.to_dict())
  other.data.data_dir = '/elsewhere'  # where the data lies is not what it holds
  assert key(other) == base
  other.features.hop_ms = 20.0
  changed = [key(config, fp='b'), key(config, tok=CharTokenizer('abc')),
             key(config, data='e'), key(other)]
  assert all(k != base for k in changed)


def test_a_kept_base_is_the_lower_bases_bottom_under_the_upper_bases_top(tmp_path, mesh1):
  from tpa_jax.study import base as base_lib
  config = tiny_config('head')
  lower = base_lib.random_base(config, str(tmp_path / 'lower'), mesh1)
  config.seed = 7
  upper = base_lib.random_base(config, str(tmp_path / 'upper'), mesh1)
  path = base_lib.kept_base(config, lower, upper, 1, str(tmp_path / 'kept'), mesh1)
  arrays = {name: host_arrays(p) for name, p in
            (('lower', lower), ('upper', upper), ('kept', path))}
  blocks = [k for k in arrays['kept'] if k.startswith("['blocks']")]
  assert blocks and any(k.startswith("['frontend']") for k in arrays['kept'])
  for k, x in arrays['kept'].items():
    if k.startswith("['frontend']"):
      np.testing.assert_array_equal(x, arrays['lower'][k])
    else:
      np.testing.assert_array_equal(x[:1], arrays['lower'][k][:1])
      np.testing.assert_array_equal(x[1:], arrays['upper'][k][1:])
  # (the two bases differ there: the test tells them apart)
  assert any(not np.array_equal(arrays['lower'][k][1:], arrays['upper'][k][1:]) for k in blocks)
  # Written once: the same inputs find it by its fingerprint.
  stamp = os.path.getmtime(path)
  assert base_lib.kept_base(config, lower, upper, 1, str(tmp_path / 'kept'), mesh1) == path
  assert os.path.getmtime(path) == stamp
  assert checkpoint.read_metadata(path)['fingerprint']['keep_blocks'] == 1
  n = config.model.num_blocks
  config.study = ml_collections.ConfigDict({'base': f'best_rq_keep{n}', 'bases': ''})
  with pytest.raises(ConfigError, match=f'K must be 1 .. {n - 1}'):
    base_lib.check(config)


def _probe(workdir, *args):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'probe.py'),
                         '--config=configs/probe.py:tiny', f'--workdir={workdir}', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow(seconds=150)
def test_probe_program_writes_every_base_and_layer_and_reuses_its_probes(tmp_path):
  workdir = str(tmp_path / 'probe')
  first = _probe(workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, 'probe.json')))
  assert set(results['tasks']) == {'lang_id_tiny', 'target_lang_tiny'}
  for task, by_base in results['tasks'].items():
    assert set(by_base) == {'random', 'best_rq'}
    for out in by_base.values():
      assert [r['layer'] for r in out['layers']] == [0, 1, 2]  # frontend + 2 tiny blocks
      assert all(0.0 <= r['test'] <= 1.5 for r in out['layers'])
  table = open(os.path.join(workdir, 'probe.md')).read()
  assert '## lang_id_tiny: accuracy %' in table and '## target_lang_tiny: CER %' in table
  assert '| random |' in table and '| best_rq |' in table
  assert os.path.getsize(os.path.join(workdir, 'probe.png')) > 1000
  # The random base again under another name: probed anew (nothing cached for the name), with
  # the same scores; the two bases probed before are read from their caches. best_rq_keep1 is
  # written beside the probe's own bases, from the BEST-RQ base and the probe's random one.
  random_path = results['bases']['random']
  second = _probe(workdir, f'--bases=random,best_rq,again={random_path},best_rq_keep1')
  assert second.returncode == 0, second.stderr[-3000:]
  log = second.stderr
  assert log.count(': cached in ') == 4, log[-3000:]
  again = json.load(open(os.path.join(workdir, 'probe.json')))
  for task in again['tasks'].values():
    assert task['again']['layers'] == task['random']['layers']
    assert [r['layer'] for r in task['best_rq_keep1']['layers']] == [0, 1, 2]
  kept = again['bases']['best_rq_keep1']
  assert kept == os.path.join(workdir, 'bases', 'best_rq_keep1', 'encoder'), kept
  fingerprint = lambda p: checkpoint.read_metadata(p)['fingerprint']
  assert fingerprint(kept) == {'lower': fingerprint(results['bases']['best_rq']),
                               'upper': fingerprint(random_path), 'keep_blocks': 1}
