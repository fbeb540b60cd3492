"""`make demo`'s pipeline in a tiny configuration, run twice as a user would (a subprocess each):
the first run prepares the corpus and pre-trains the base, the second reuses both."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(workdir, *overrides):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as `make demo`
  result = subprocess.run(
      [sys.executable, 'launch/demo.py', '--config=configs/demo.py:tiny', f'--workdir={workdir}',
       *overrides],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return result, json.load(open(os.path.join(workdir, 'results.json')))


@pytest.mark.slow(seconds=93)
def test_tiny_demo_end_to_end_and_cached_base(tmp_path):
  first, results = run_demo(tmp_path)
  for key in ('source_wer', 'target_wer_before', 'target_wer_after'):
    assert 0.0 <= results[key] < 5.0
  assert 0 < results['trainable_fraction'] < 0.15
  # The demo decodes with the lexicon; best-path rates of the same outputs come alongside.
  assert results['decoding'] == 'lexicon'
  for name in ('source', 'target_before', 'target_after'):
    assert 0.0 <= results['greedy'][name]['wer'] < 5.0
  assert 'best path' in first.stdout
  stages = ('prepare', 'tokenizers', 'pretrain', 'evaluate_base', 'adapt', 'evaluate_adapted')
  assert set(results['seconds']) == set(stages) | {'total'}
  assert results['seconds']['total'] >= sum(results['seconds'][s] for s in stages) - 1.0
  assert results['pretrained_now'] is True
  # Progress with an ETA while training, and the table at the end.
  assert 'ETA' in first.stderr and 'relative WER reduction' in first.stdout
  steps = results['curves']['adapt'][-1]['step']
  adapt_run = tmp_path / 'adapt' / 'checkpoints' / str(steps)
  for name in ('learning_curves.png', 'metrics.jsonl', 'base/encoder', 'base/head',
               adapt_run / 'commit_success.txt'):
    assert os.path.exists(tmp_path / name), name
  stages_logged = {json.loads(line)['stage'] for line in open(tmp_path / 'metrics.jsonl')}
  assert stages_logged == {'pretrain', 'adapt'}
  run = json.load(open(adapt_run / 'run' / 'metadata'))
  assert run['config']['base']['path'] == str(tmp_path / 'base' / 'encoder')
  assert run['adapter']['placement'] == 'ff_parallel'

  # The adapters trained here, served: exported from the adaptation run (which names the demo's
  # corpus and tokenizers) with the demo's lexicon decoder, evaluated from the export, and
  # served by launch/transcribe.py's multi-task model from WAV files, they score the demo's
  # WER, utterance count included.
  served = subprocess.run(
      [sys.executable, 'benchmarks/served_tasks.py', f'--workdir={tmp_path / "served"}',
       f'--runs=es={tmp_path / "adapt"}', '--decoding=lexicon'],
      cwd=ROOT, env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
      capture_output=True, text=True, timeout=600)
  assert served.returncode == 0, served.stderr[-4000:]
  record, total = [json.loads(line) for line in served.stdout.splitlines()[-2:]]
  assert record['task'] == 'es' and record['decoding'] == 'lexicon' and record['equal'], record
  assert record['served'] == results['target_wer_after']
  assert total['written'] == record['utterances'] and total['skipped'] == 0
  assert not os.path.exists(tmp_path / 'adapt' / 'data')  # the demo's corpus was read

  # Second run, adapting with another method: the corpus and the base are
  # reused (the base's cache key covers only what determines the base); the restored base
  # scores exactly the same.
  _, again = run_demo(tmp_path, '--config.demo.adapt.method=head')
  assert again['pretrained_now'] is False
  assert again['seconds']['pretrain'] < results['seconds']['pretrain']
  assert again['source_wer'] == results['source_wer']
  assert again['target_wer_before'] == results['target_wer_before']
  # The restored base has the fingerprint the adapters were trained on.
  assert (json.load(open(adapt_run / 'run' / 'metadata'))['base_fingerprint']
          == run['base_fingerprint'])
  np.testing.assert_allclose(again['curves']['pretrain'][-1]['loss'],
                             results['curves']['pretrain'][-1]['loss'])
