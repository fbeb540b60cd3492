"""BEST-RQ pre-training as a user runs it (launch/pretrain.py): a tiny run learns, keeps its
fixed quantizer out of the optimizer, is killed and resumed bit-identically, and writes a base
that launch/train.py adapts with TPA under the same fingerprint; bad settings are named before
anything compiles."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tpa_jax import checkpoint
from tpa_jax.config.files import load_config_file
from tpa_jax.config.ssl import pretrain_config
from tpa_jax.errors import ConfigError
from tpa_jax.train import trainer as trainer_lib

from conftest import Job, built_once, host_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12  # configs/pretrain.py:tiny
EVERY = 4


def pretrain(workdir, data_dir, *overrides, wait=True):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  args = [sys.executable, 'launch/pretrain.py', '--config=configs/pretrain.py:tiny',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          '--config.train.log_every_steps=1', *overrides]
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-4000:]
  return err


def metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def final_state(workdir, step=NUM_STEPS):
  return host_arrays(os.path.join(workdir, 'checkpoints', str(step), 'state'))


def _uninterrupted_run(tmp_path_factory):
  """A tiny pre-training run and its corpus, once per session: <root>/best_rq (where a study
  with base_workdir=<root> looks for its cached BEST-RQ base) and <root>/data."""
  def build(root):
    pretrain(root / 'best_rq', str(root / 'data'))
  return built_once(tmp_path_factory, 'pretrain', build)[0]


@pytest.fixture
def data_dir(tmp_path_factory):
  return str(_uninterrupted_run(tmp_path_factory) / 'data')


@pytest.fixture
def uninterrupted(tmp_path_factory):
  return _uninterrupted_run(tmp_path_factory) / 'best_rq'


@pytest.mark.slow(seconds=50)
def test_a_tiny_pretraining_learns_and_its_quantizer_never_trains(uninterrupted):
  logged = metrics(uninterrupted)
  assert [r['step'] for r in logged] == list(range(1, NUM_STEPS + 1))
  first, last = logged[:3], logged[-3:]
  mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
  assert mean(last, 'loss') < mean(first, 'loss') - 0.05
  # Above chance: better than predicting the most frequent target of each batch, which is
  # right for at most 1/usage-of-the-codebook ... bounded here by the uniform 1/16 and by
  # the accuracy the run started with.
  assert mean(last, 'accuracy_0') > max(1 / 16, mean(first, 'accuracy_0'))
  assert all(0 < r['codebook_usage_0'] <= 1 and r['masked_frames'] > 0 for r in logged)

  # The run checkpoint holds trainable weights and their optimizer state, and no fixed array;
  # the fixed arrays are saved with the run, and are the ones the written base's head holds.
  state = final_state(uninterrupted)
  assert not any('quantizer' in k for k in state)
  assert any("'heads'" in k for k in state) and any("'blocks'" in k for k in state)
  fixed = host_arrays(os.path.join(uninterrupted, 'fixed_arrays'))
  assert {k.split("'")[-2] for k in fixed} == {'projection', 'codebooks'}
  head = host_arrays(os.path.join(uninterrupted, 'base', 'head'))
  for key, value in fixed.items():
    np.testing.assert_array_equal(head[key.replace("['head']", '', 1)], value)
  results = json.load(open(uninterrupted / 'results.json'))
  meta = checkpoint.read_metadata(str(uninterrupted / 'base' / 'encoder'))
  assert meta['pretraining'] == 'best_rq' and len(meta['curve']) == NUM_STEPS
  assert results['base_fingerprint'] == meta['base_fingerprint']['id']


@pytest.mark.slow(seconds=31)
def test_killed_and_resumed_it_ends_bit_identical(uninterrupted, data_dir, tmp_path):
  seed = int(time.time())
  kill_at = random.Random(seed).randrange(EVERY + 1, NUM_STEPS - 1)
  proc = pretrain(tmp_path, data_dir, wait=False)
  deadline = time.time() + 300
  path = tmp_path / 'metrics.jsonl'
  while not path.exists() or len(path.read_text().splitlines()) < kill_at:
    assert proc.poll() is None and time.time() < deadline, f'seed {seed}: run ended early'
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / 'base').exists()  # no base before the run completes
  checkpoints = tmp_path / 'checkpoints'
  killed_at = [int(s) for s in os.listdir(checkpoints) if s.isdigit() and
               (checkpoints / s / 'commit_success.txt').exists()] if checkpoints.exists() else []
  err = pretrain(tmp_path, data_dir)
  assert 'fixed arrays restored' in err, f'seed {seed}'
  if killed_at:  # (a save still in flight at the kill does not count)
    assert f'resumed from step {max(killed_at)}' in err, f'seed {seed}'
  a, b = final_state(uninterrupted), final_state(tmp_path)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  ea, eb = (host_arrays(os.path.join(w, 'base', 'encoder')) for w in (uninterrupted, tmp_path))
  for key in ea:
    np.testing.assert_array_equal(ea[key], eb[key], err_msg=key)
  steps = [r['step'] for r in metrics(tmp_path)]
  assert steps == list(range(1, NUM_STEPS + 1)), f'seed {seed}'


@pytest.mark.slow(seconds=43)
def test_the_ssl_study_adapts_the_written_base_and_a_random_one_under_their_fingerprints(
    uninterrupted, data_dir, tmp_path):
  """configs/study.py:ssl's plumbing at tiny size: the study finds the base launch/pretrain.py
  wrote (its cache key fits) and adapts it with TPA in ordinary training runs, beside the same
  architecture left at random initialisation; every cell's run records the fingerprint of the
  base written for it. (The supervised base is the default study's, tested in
  test_study.py.)"""
  workdir = tmp_path / 'study'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  args = [sys.executable, 'launch/study.py', '--config=configs/study.py:ssl_tiny',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          '--config.study.bases=best_rq,random',
          f'--config.study.compile_cache={os.environ["JAX_COMPILATION_CACHE_DIR"]}',
          f'--config.study.base_workdir={uninterrupted.parent}',
          '--config.study.eval_every_steps=12']  # one validation per run (test time)
  result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  rows = json.load(open(workdir / 'study.json'))
  assert sorted((r['base'], r['method'], r['status']) for r in rows) == [
      ('best_rq', 'tpa', 'ok'), ('random', 'tpa', 'ok')]
  assert 'using the cached BEST-RQ base' in result.stderr  # not pre-trained again
  bases = {'best_rq': uninterrupted / 'base' / 'encoder',
           'random': workdir / 'random' / 'base' / 'encoder'}
  fingerprints = set()
  for name, base in bases.items():
    meta = checkpoint.read_metadata(str(base))
    assert meta is not None, name
    (record,) = [os.path.join(d, 'run', 'metadata') for d in
                 (workdir / name / 'cells').glob('*/tpa/*/seed=0/checkpoints/*')]
    run = json.load(open(record))
    assert run['config']['base']['path'] == str(base)
    if name == 'best_rq':
      assert meta['pretraining'] == 'best_rq'
      assert run['base_fingerprint']['id'] == meta['base_fingerprint']['id']
    fingerprints.add(run['base_fingerprint']['id'])
  assert len(fingerprints) == 2
  table = open(workdir / 'study.md').read()
  assert re.search(r'^\| best_rq \| tpa \| .*% vs random\) \|$', table, flags=re.M), table
  assert re.search(r'^\| random \| tpa \| ', table, flags=re.M)


@pytest.mark.slow(seconds=71)
def test_two_processes_pretrain_as_one_does(uninterrupted, data_dir, tmp_path):
  """Two JAX processes on localhost, one CPU device each, split every batch and end where the
  one-device run ends: a row's masked spans, noise and targets do not depend on the process
  that holds it, and both processes build the same fixed quantizer."""
  run = tmp_path / 'run'
  job = Job(str(tmp_path), 'pretrain', 'launch/pretrain.py', '--config=configs/pretrain.py:tiny',
            f'--config.data.data_dir={data_dir}', '--config.train.log_every_steps=1')
  job.start_processes(str(run), 2, devices=1).wait(time.time() + 480)
  assert "'data': 2" in job.log(0)  # the batch split over the processes
  a, b = final_state(uninterrupted), final_state(run)
  assert a.keys() == b.keys()
  weights = [k for k in a if k.startswith("['trainable']")]
  assert len(weights) > 20
  for key in weights:
    if "['key']['bias']" in key:
      # A softmax over keys does not change with the key bias: its exact gradient is 0, and
      # Adam scales the rounding noise it gets instead to steps of the rate's size (as it
      # does in the optimizer's moments of other near-zero gradients, not compared).
      continue
    # Cross-process all-reduces sum in another order than one device: equal up to rounding.
    np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
  fixed_a, fixed_b = (host_arrays(os.path.join(w, 'fixed_arrays')) for w in (uninterrupted, run))
  for key in fixed_a:
    np.testing.assert_array_equal(fixed_a[key], fixed_b[key], err_msg=key)
  # The masked-frame count and the loss of every step: the same rows, masked the same.
  for x, y in zip(metrics(uninterrupted), metrics(run), strict=True):
    assert x['step'] == y['step'] and x['masked_frames'] == y['masked_frames'], (x, y)
    np.testing.assert_allclose(y['loss'], x['loss'], rtol=1e-4)
  assert (run / 'base' / 'encoder').exists()


def test_a_cache_folder_holding_another_pretraining_is_refused_not_resumed(uninterrupted,
                                                                            data_dir):
  # A study's shared cache folder (study.base_workdir) after a change of the ssl sections: the
  # checkpoints there are another base's, and resuming them would train neither.
  from tpa_jax.ssl import pretrain as pretrain_lib
  config = load_config_file('configs/study.py:ssl_tiny')
  config.data.data_dir = data_dir
  folder = str(uninterrupted)
  assert pretrain_lib.ensure_base(config, folder) == str(uninterrupted / 'base' / 'encoder')
  steps = sorted(os.listdir(uninterrupted / 'checkpoints'))
  config.ssl_pretrain.num_steps = 2 * NUM_STEPS
  config.ssl.mask_prob = 0.3
  with pytest.raises(ConfigError, match=(
      r'another BEST-RQ pre-training \(ssl.mask_prob: 0.2 there, 0.3 here; train.num_steps: '
      r'12 there, 24 here\).*study.base_workdir')):
    pretrain_lib.ensure_base(config, folder)
  assert sorted(os.listdir(uninterrupted / 'checkpoints')) == steps


def test_the_pretraining_data_may_be_a_mixture_of_datasets():
  # Each part is checked when the mixture is opened (tests/test_speech_data.py); the run config
  # reads it as it is, where a single name goes through the presets.
  config = load_config_file('configs/study.py:ssl')
  mixture = 'synthetic_speech/source+manifest:runs/my_audio'
  config.ssl_pretrain.dataset = mixture
  c = pretrain_config(config)
  assert c.data.name == mixture and c.data.train_split == 'train' and c.head.kind == 'best_rq'
  config.ssl_pretrain.dataset = 'synthetic_speech/nope'
  with pytest.raises(ValueError, match='accepted synthetic_speech domains'):
    pretrain_config(config)


@pytest.mark.parametrize('override, message', [
    (dict(data=('name', 'random')), r"data.name='random'.*audio"),
    (dict(ssl=('mask_prob', 1.0)), r'ssl.mask_prob=1.0.*\(0, 1\)'),
    (dict(ssl=('mask_span', 200)), r'ssl.mask_span=200.*shortest bucket'),
    (dict(ssl=('codebook_size', 1)), r'ssl.codebook_size=1.*>= 2'),
    (dict(ssl=('stack', 2)), r'ssl.stack=2.*stacks 3'),
])
def test_bad_settings_are_named_before_anything_compiles(override, message):
  config = load_config_file('configs/pretrain.py:tiny')
  ((section, (field, value)),) = override.items()
  config[section][field] = value
  with pytest.raises(ConfigError, match=message):
    trainer_lib.check_config(config, mesh=False)
