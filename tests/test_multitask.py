"""Many tasks over one frozen base on disk: adapter exports loaded into a bank, mixed batches
equal to each task's own model (text and labels), the same outputs on 4 devices as on 1,
slots added and removed without compiling, bad tasks refused, and launch/transcribe.py."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import free_port, tiny_config, trained_task
from tpa_jax import checkpoint, sharding
from tpa_jax.checkpoint import adapter_file
from tpa_jax.data import pcm
from tpa_jax.data.tokenizer import CharTokenizer
from tpa_jax.errors import SpecMismatchError, UserError
from tpa_jax.eval import decoding
from tpa_jax.serve import multitask
from tpa_jax.audio.featurizer import featurizer as make_featurizer
from tpa_jax.nn import build
from tpa_jax.train import trainer as trainer_lib

ALPHABET = 'abcdefghijklmnop '
LABELS = ['en', 'es', 'de']
# name -> (method, overrides)
TASKS = {
    'tpa': ('tpa', {'adapter.bottleneck': 8}),
    'lora': ('lora', {'adapter.bottleneck': 2, 'adapter.blocks': '2:4',
                      'adapter.lora_targets': 'q,v,ffn1'}),
    'serial': ('block_sequential', {'adapter.bottleneck': 4, 'adapter.blocks': '1:4'}),
    'lid': ('tpa', {'adapter.bottleneck': 4, 'adapter.blocks': '2:4',
                    'head.kind': 'classification', 'head.num_classes': len(LABELS)}),
}
BUCKETS = (0.5, 1.0)


def base_config(base_path=''):
  return tiny_config('head', **{'data.bucket_seconds': BUCKETS, 'base.path': base_path,
                                'train.frozen_dtype': 'float32'})


@pytest.fixture(scope='module')
def served(tmp_path_factory, mesh1):
  """(config, exports {name: path}, reference models {name: model})."""
  root = tmp_path_factory.mktemp('multitask')
  base = build.create_model(base_config(), mesh1, seed=0)
  checkpoint.save_state(str(root / 'base'), checkpoint.base_state(base))
  config = base_config(str(root / 'base'))
  loaded = trainer_lib.load_model(multitask.base_config(config), mesh1)
  fingerprint = checkpoint.base_fingerprint(config.model, loaded)
  exports, models = {}, {}
  for i, (name, (method, overrides)) in enumerate(TASKS.items()):
    overrides = {**overrides, 'data.bucket_seconds': BUCKETS}
    if 'head.kind' not in overrides:
      overrides['head.vocab_size'] = len(ALPHABET) + 1
    task_config, model, spec, tensors = trained_task(method, overrides, mesh1, seed=10 + i)
    spec = dataclasses.replace(spec, base_fingerprint=fingerprint['id'])
    path = str(root / f'{name}.safetensors')
    kind = {'labels': LABELS} if spec.head_kind == 'classification' else {
        'tokenizer': CharTokenizer(ALPHABET)}
    adapter_file.write_adapters(path, tensors, task_config, spec, fingerprint, 0, **kind)
    exports[name], models[name] = path, model
  return config, exports, models, root


def utterances(seed=0, lengths=(12000, 5000, 16000)):
  rng = np.random.default_rng(seed)
  return [(rng.normal(0, 3000, n)).clip(-32768, 32767).astype(np.int16) for n in lengths]


def reference(config, models, name, audio):
  """What task `name`'s own single-task model says about `audio`."""
  featurizer = make_featurizer(config)
  features, mask = featurizer(audio[None], np.array([len(audio)], np.int32))
  logits, out_mask = models[name](features, mask)
  if logits.ndim == 2:
    probs = np.asarray(jax.nn.softmax(logits[0]))
    return {'task': name, 'label': LABELS[int(probs.argmax())], 'probability': float(probs.max())}
  ids = decoding.collapse(np.asarray(logits[0]).argmax(-1)[np.asarray(out_mask[0])])
  return {'task': name, 'text': CharTokenizer(ALPHABET).decode(ids)}


def assert_same(got, want):
  assert [r['task'] for r in got] == [r['task'] for r in want]
  for g, w in zip(got, want):
    if 'text' in w:
      assert g == w
    else:
      assert g['label'] == w['label'] and abs(g['probability'] - w['probability']) < 1e-5


def test_mixed_batches_equal_each_task_model_on_1_and_4_devices(served, mesh1, mesh22):
  config, exports, models, _ = served
  audio = utterances()
  asks = [['tpa', 'lid'], ['lora'], ['serial', 'tpa', 'lora', 'lid']]
  outputs = {}
  for mesh in (mesh1, mesh22):
    model = multitask.MultiTaskModel(config, mesh, tasks=exports, capacity=6,
                                     batch_sizes=(2, 8) if mesh is mesh1 else (8,))
    if mesh is mesh22:  # the frozen encoder is sharded by the training rules
      kernel = model.encoder.blocks.ffn1.up.kernel[...]
      assert kernel.sharding.spec == sharding.variable_spec(model.encoder.blocks.ffn1.up.kernel,
                                                            mesh)
      assert len(kernel.sharding.device_set) == 4
    model.warmup()
    compiled = model.compilations()
    outputs[mesh] = model.infer(audio, asks)
    if mesh is mesh1:  # rows after the shared prefix in chunks of 2 (4 rows: 2 chunks)
      chunked = model.infer(audio[:2], [['serial', 'tpa', 'lora'], ['lid']], suffix_rows=2)
      for u, names in enumerate([['serial', 'tpa', 'lora'], ['lid']]):
        assert_same(chunked[u], [reference(config, models, n, audio[u]) for n in names])
    assert model.compilations() == compiled
  for u, names in enumerate(asks):
    want = [reference(config, models, n, audio[u]) for n in names]
    assert_same(outputs[mesh1][u], want)
    assert_same(outputs[mesh22][u], want)


def test_lexicon_decoding_carried_by_an_export_equals_the_task_model_decoded_with_it(
    served, mesh1, tmp_path):
  """An export of a run that decoded with the lexicon decoder carries it; served with
  decoding_kind='lexicon', its text is that decoder's over the task's own log-probabilities;
  a task whose export carries none is decoded by best path."""
  config, exports, models, _ = served
  words = {'ab': 5, 'cab': 3, 'deed': 2, 'face': 2, 'gig': 1, 'hop': 1, 'mop': 1, 'p': 4}
  lexicon = decoding.lexicon_settings(
      ml_collections.ConfigDict(dict(kind='lexicon', lm_smoothing=0.5, alpha=0.5, beta=2.0,
                                     beam_width=8, token_min_log_prob=-8.0)),
      lambda: [' '.join(w for w, n in words.items() for _ in range(n))])
  assert lexicon['word_counts'] == words
  path = str(tmp_path / 'tpa_lexicon.safetensors')
  tensors, _ = adapter_file.read_adapters(exports['tpa'])
  spec = adapter_file.read_spec(exports['tpa'])
  adapter_file.write_adapters(path, tensors, tiny_config('tpa', **{'adapter.bottleneck': 8}), spec,
                        {'id': spec.base_fingerprint, 'weights': 'w', 'config': {}}, 0,
                        tokenizer=CharTokenizer(ALPHABET), lexicon=lexicon)
  with pytest.raises(UserError, match=r"decoding='beam': accepted values are \('best_path', "
                     r"'lexicon'\)"):
    multitask.MultiTaskModel(config, mesh1, tasks={'tpa': path}, capacity=1,
                             decoding_kind='beam')
  model = multitask.MultiTaskModel(config, mesh1, tasks={'lex': path, 'lora': exports['lora']},
                                   capacity=2, batch_sizes=(8,), decoding_kind='lexicon')
  assert model.tasks['lex'].describe()['decoding'] == 'lexicon'
  assert model.tasks['lora'].describe()['decoding'] == 'best_path'
  audio = utterances(3)
  got = model.infer(audio, [['lex', 'lora'], ['lex'], ['lora', 'lex']])
  decoder = decoding.lexicon_decoder(lexicon, CharTokenizer(ALPHABET))
  featurizer = make_featurizer(config)
  texts = set()
  for u, a in enumerate(audio):
    features, mask = featurizer(a[None], np.array([len(a)], np.int32))
    logits, out_mask = models['tpa'](features, mask)
    log_probs = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float32), -1))
    want = decoder.decode(log_probs[np.asarray(out_mask[0])])
    assert [r['text'] for r in got[u] if r['task'] == 'lex'] == [want]
    assert set(want.split()) <= set(words)
    texts.add(want)
    assert [r for r in got[u] if r['task'] == 'lora'] == (
        [reference(config, models, 'lora', a)] if u != 1 else [])
  assert texts != {''}  # the decoder spelled words, not only silence


def test_tasks_are_added_and_removed_without_compiling_and_bad_ones_refused(served, mesh1):
  config, exports, models, root = served
  model = multitask.MultiTaskModel(config, mesh1, tasks={'tpa': exports['tpa']}, capacity=2,
                                   reserve=[exports['lid']], batch_sizes=(4,))
  model.warmup()
  compiled = model.compilations()
  audio = utterances(1, (8000, 15000))
  before = model.infer(audio, [['tpa'], ['tpa']])
  model.add('lid', exports['lid'])
  with pytest.raises(UserError, match=r'the bank is full: its capacity is 2 tasks'):
    model.add('lid2', exports['lid'])
  mixed = model.infer(audio, [['lid', 'tpa'], ['tpa']])
  assert mixed[0][1] == before[0][0] and mixed[1] == before[1]
  assert_same(mixed[0][:1], [reference(config, models, 'lid', audio[0])])
  model.remove('lid')
  with pytest.raises(multitask.UnknownTaskError, match=r"unknown task 'lid'; the tasks served "
                     r"are \['tpa'\]"):
    model.infer(audio, [['lid'], []])
  model.add('lid', exports['lid'])  # back into the freed slot
  assert_same(model.infer(audio, [['lid'], []])[0], mixed[0][:1])  # (a deeper shared prefix)
  assert model.compilations() == compiled
  # A task the layout cannot hold, and adapters of another base.
  with pytest.raises(SpecMismatchError, match=r"task 'serial' does not fit the bank .*no "
                     r"group for block_sequential"):
    model.remove('lid')
    model.add('serial', exports['serial'])
  other = str(root / 'other.safetensors')
  tensors, _ = adapter_file.read_adapters(exports['tpa'])
  spec = adapter_file.read_spec(exports['tpa'])
  adapter_file.write_adapters(other, tensors, tiny_config('tpa', **{'adapter.bottleneck': 8}),
                        dataclasses.replace(spec, base_fingerprint='0123456789abcdef'),
                        {'id': '0123456789abcdef', 'weights': 'w', 'config': {}}, 0,
                        tokenizer=CharTokenizer(ALPHABET))
  with pytest.raises(SpecMismatchError, match=r'trained on base 0123456789abcdef, this '
                     rf"server's base is {model.fingerprint}"):
    model.add('other', other)
  with pytest.raises(UserError, match=r'lasts 2.00 s, longer than the 1.00 s accepted'):
    model.infer([np.zeros(32000, np.int16)], [['tpa']])

  # The batcher: requests of a task removed while they wait get a 404 (never another task's
  # output, though another task took the slot); a failed batch answers its requests with the
  # error, and the next batch is served.
  from tpa_jax.serve import server
  model.add('lid', exports['lid'])
  batcher = server.Batcher(model, max_wait_ms=1500)
  try:
    waiting = batcher.submit(audio[0], ['lid'])  # waits up to 1.5 s for its batch to fill
    model.remove('lid')
    model.add('lid2', exports['lid'])  # the same slot, another task's name
    with pytest.raises(server.RequestError, match=r"task 'lid' was removed before this "
                       r"request ran; the tasks served are \['lid2', 'tpa'\]") as e:
      waiting.result(timeout=60)
    assert e.value.status == 404
    real_infer, calls = model.infer, []

    def failing_once(*args, **kw):
      calls.append(1)
      if len(calls) == 1:
        raise RuntimeError('injected device failure')
      return real_infer(*args, **kw)
    model.infer = failing_once
    first = [batcher.submit(audio[1], ['tpa']) for _ in range(2)]  # one batch
    for f in first:
      with pytest.raises(server.RequestError, match='the batch failed: RuntimeError: injected'):
        f.result(timeout=60)
    again = batcher.submit(audio[1], ['tpa', 'lid2']).result(timeout=60)
    assert_same(again, [before[1][0], {**reference(config, models, 'lid', audio[1]),
                                       'task': 'lid2'}])
  finally:
    batcher.close()
  assert model.compilations() == compiled


def test_transcribe_writes_one_line_per_input_and_counts_skipped_ones(served, tmp_path):
  config, exports, models, root = served
  audio = utterances(2, (9000, 14000))
  paths = []
  for i, a in enumerate(audio):
    paths.append(str(tmp_path / f'u{i}.wav'))
    with open(paths[-1], 'wb') as f:
      f.write(pcm.encode_wav(a, 16000))
  with open(tmp_path / 'stereo.wav', 'wb') as f:
    f.write(pcm.encode_wav(np.zeros(8000, np.int16), 16000)[:22] + b'\x02' +
            pcm.encode_wav(np.zeros(8000, np.int16), 16000)[23:])
  with open(tmp_path / 'rate.wav', 'wb') as f:
    f.write(pcm.encode_wav(np.zeros(8000, np.int16), 8000))
  with open(tmp_path / 'long.wav', 'wb') as f:
    f.write(pcm.encode_wav(np.ones(20000, np.int16), 16000))
  lines = [f'{paths[0]}\ttpa,lid', f'{tmp_path}/missing.wav\ttpa', f'{paths[1]}\tnope',
           f'{tmp_path}/stereo.wav\ttpa', f'{tmp_path}/rate.wav\ttpa',
           f'{tmp_path}/long.wav\ttpa', 'no tab here', f'{paths[1]}\tlora,serial']
  (tmp_path / 'list.tsv').write_text('\n'.join(lines) + '\n')
  (tmp_path / 'base_config.json').write_text(config.to_json())
  adapters = ','.join(f'{n}={p}' for n, p in exports.items())
  cmd = [sys.executable, 'launch/transcribe.py', '--config=configs/adapt.py:model=tiny',
         f'--config.base.path={config.base.path}', '--config.data.bucket_seconds=0.5,1.0',
         '--config.train.frozen_dtype=float32', f'--adapters={adapters}',
         f'--input={tmp_path}/list.tsv', f'--output={tmp_path}/out.jsonl', '--batch_size=4']
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['written'] == 2 and summary['skipped'] == 6
  assert summary['skipped_by_reason'] == {'unreadable file': 1, 'unknown task': 1,
                                          'bad audio': 2, 'audio length': 1,
                                          'malformed line': 1}
  assert '2 channels; accepted: a WAV file of 16-bit PCM, one channel, 16000 Hz' in result.stderr
  out = [json.loads(line) for line in open(tmp_path / 'out.jsonl')]
  assert [o['line'] for o in out] == [1, 8]
  assert_same(out[0]['results'], [reference(config, models, n, audio[0]) for n in ('tpa', 'lid')])
  assert_same(out[1]['results'], [reference(config, models, n, audio[1])
                                  for n in ('lora', 'serial')])


def test_the_server_batches_mixed_tasks_and_refuses_bad_requests(served, tmp_path):
  import base64
  import concurrent.futures
  import time

  import requests

  config, exports, models, root = served
  port = free_port()
  adapters = ','.join(f'{n}={p}' for n, p in exports.items() if n != 'serial')
  cmd = [sys.executable, 'launch/serve.py', '--config=configs/adapt.py:model=tiny',
         f'--config.base.path={config.base.path}', '--config.data.bucket_seconds=0.5,1.0',
         f'--adapters={adapters}', f'--reserve={exports["serial"]}', '--capacity=4',
         f'--port={port}', '--batch_sizes=4', '--max_wait_ms=50']
  log = open(tmp_path / 'server.log', 'w')
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  url = f'http://127.0.0.1:{port}'
  try:
    for _ in range(600):
      try:
        health = requests.get(f'{url}/healthz', timeout=1).json()
        break
      except requests.ConnectionError:
        assert proc.poll() is None, (tmp_path / 'server.log').read_text()[-3000:]
        time.sleep(0.5)
    assert health['tasks'] == ['lid', 'lora', 'tpa']
    listed = requests.get(f'{url}/v1/tasks').json()
    assert listed['capacity'] == 4 and [t['name'] for t in listed['tasks']] == ['tpa', 'lora',
                                                                                  'lid']
    assert listed['tasks'][1]['blocks'] == [2, 3] and listed['tasks'][1]['placement'] == 'lora'

    audio = utterances(3, (6000, 9000, 16000, 11000, 7000, 15000))
    wav = [base64.b64encode(pcm.encode_wav(a, 16000)).decode() for a in audio]
    asks = [['tpa'], ['lid', 'lora'], ['lora'], ['tpa', 'lid'], ['lid'], ['tpa', 'lora', 'lid']]

    def ask(i):
      body = {'task': asks[i][0]} if len(asks[i]) == 1 else {'tasks': asks[i]}
      return requests.post(f'{url}/v1/recognize', json={**body, 'audio': wav[i]}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      answers = list(pool.map(ask, range(len(asks))))
    for i, answer in enumerate(answers):
      assert answer.status_code == 200, answer.text
      assert_same(answer.json()['results'],
                  [reference(config, models, n, audio[i]) for n in asks[i]])
    assert requests.get(f'{url}/healthz').json()['compilations'] == health['compilations']

    def post(body, **kw):
      return requests.post(f'{url}/v1/recognize', timeout=60, **({'data': body} if isinstance(
          body, (str, bytes)) else {'json': body}), **kw)
    cases = [
        ('{"task": ', 400, 'not JSON'),
        ({'task': 'tpa', 'audio': '###'}, 400, 'not valid base64'),
        ({'task': 'tpa', 'audio': base64.b64encode(b'RIFF....').decode()}, 400,
         'not a PCM WAV file'),
        ({'task': 'tpa', 'audio': base64.b64encode(pcm.encode_wav(audio[0], 8000)).decode()},
         400, 'sampled at 8000 Hz; accepted: a WAV file of 16-bit PCM, one channel, 16000 Hz'),
        ({'task': 'tpa', 'audio': base64.b64encode(pcm.encode_wav(np.zeros(0), 16000)).decode()},
         400, 'no samples'),
        ({'task': 'tpa', 'audio': base64.b64encode(pcm.encode_wav(np.ones(40000), 16000)
                                                   ).decode()}, 413, 'longer than the 1.00 s'),
        ({'task': 'nope', 'audio': wav[0]}, 404,
         "unknown task 'nope'; the tasks served are ['lid', 'lora', 'tpa']"),
    ]
    for body, status, message in cases:
      answer = post(body)
      assert answer.status_code == status and message in answer.json()['error'], answer.text

    # Tasks: one added into the last free slot, then the bank is full; removed; other bases.
    added = requests.post(f'{url}/v1/tasks', json={'name': 'serial', 'path': exports['serial']})
    assert added.status_code == 200 and added.json()['slot'] == 3, added.text
    full = requests.post(f'{url}/v1/tasks', json={'name': 'tpa2', 'path': exports['tpa']})
    assert full.status_code == 409 and 'capacity is 4 tasks' in full.json()['error']
    answer = post({'task': 'serial', 'audio': wav[1]})
    assert_same(answer.json()['results'], [reference(config, models, 'serial', audio[1])])
    assert requests.delete(f'{url}/v1/tasks/serial').status_code == 200
    gone = requests.delete(f'{url}/v1/tasks/serial')
    assert gone.status_code == 404 and 'unknown task' in gone.json()['error']
    assert requests.get(f'{url}/healthz').json()['compilations'] == health['compilations']
    metrics = requests.get(f'{url}/metrics').text
    assert 'tpa_requests_total{task="tpa"} 4' in metrics  # 3 answered, 1 too long
    assert 'tpa_errors_total{task="tpa",kind="http_413"} 1' in metrics
    assert 'tpa_errors_total{task="nope",kind="http_404"} 1' in metrics
    assert 'tpa_batch_rows_count' in metrics and 'tpa_queue_seconds_sum' in metrics
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # never leave a server behind
      proc.kill()
      proc.wait()
    log.close()


def test_a_multitask_bundle_runs_a_mixed_batch_with_the_loader_alone(served, tmp_path):
  """The bundle carries the base once; tasks are added from their adapter exports by the
  standalone loader (copied away from tpa_jax), and a mixed batch equals each task's model."""
  import shutil

  from conftest import ctc_batch
  from tpa_jax.serve import serving_loader
  from tpa_jax.nn import adapters as adapters_lib
  assert serving_loader.PLACEMENT_SLOTS == adapters_lib.PLACEMENTS
  config, exports, models, _ = served
  root = os.path.dirname(os.path.dirname(__file__))
  shaping = ','.join(f'{n}={exports[n]}' for n in ('tpa', 'lora', 'lid'))
  result = subprocess.run(
      [sys.executable, 'launch/export.py', '--kind=serving', '--config=configs/adapt.py:model=tiny',
       f'--config.base.path={config.base.path}', f'--adapters={shaping}', '--capacity=3',
       '--platforms=cpu', f'--output={tmp_path}/bundle'],
      capture_output=True, text=True, timeout=600, cwd=root)
  assert result.returncode == 0, result.stderr[-3000:]
  sizes = json.loads(result.stdout.strip().splitlines()[-1])['bytes']
  assert set(sizes) == {'function.jaxexport', 'base.safetensors', 'manifest.json'}
  batch = ctc_batch(config, seed=5, batch_size=3, num_frames=48)
  np.save(tmp_path / 'features.npy', batch['features'])
  np.save(tmp_path / 'mask.npy', batch['feature_mask'])
  shutil.copy(os.path.join(root, 'tpa_jax/serve/serving_loader.py'), tmp_path / 'loader.py')
  script = f'''
import sys, numpy as np
import loader
b = loader.MultiTaskBundle({str(tmp_path / "bundle")!r})
for name, path in {[(n, exports[n]) for n in ('lid', 'tpa', 'lora')]!r}:
  b.add(name, path)
out = b(np.load('features.npy'), np.load('mask.npy'), [['tpa', 'lid'], ['lora'], ['lid', 'lora']])
np.savez('out.npz', **{{f'{{u}}-{{name}}': logits for u, rows in enumerate(out)
                        for name, logits in rows}})
assert not any(m.startswith('tpa_jax') for m in sys.modules), 'the loader imported tpa_jax'
'''
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, 'PYTHONPATH': ''})
  assert result.returncode == 0, result.stderr[-3000:]
  out = np.load(tmp_path / 'out.npz')
  assert sorted(out.files) == ['0-lid', '0-tpa', '1-lora', '2-lid', '2-lora']
  for key in out.files:
    u, name = key.split('-')
    logits, mask = models[name](batch['features'], batch['feature_mask'])
    want = np.asarray(logits[int(u)])
    if want.ndim == 2:
      want = want[np.asarray(mask[int(u)])]
    np.testing.assert_allclose(out[key], want, atol=1e-5, rtol=0, err_msg=key)

