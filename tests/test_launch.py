"""The launch programs, run as users run them: a subprocess with absl flags."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tpa_jax import checkpoint
from tpa_jax import sharding
from tpa_jax.data import random_task
from tpa_jax.programs import evaluate as evaluation
from tpa_jax.nn import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300, devices=4):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A finished launch/train.py run of configs/tiny.py (40 steps) on a 2 x 2 mesh."""
  workdir = tmp_path_factory.mktemp('tiny_run')
  result = run('launch/train.py', '--config=configs/tiny.py', f'--workdir={workdir}',
               '--config.mesh.data=2', '--config.mesh.fsdp=2')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_train_writes_metrics_and_learns(tiny_run):
  rows = [json.loads(line) for line in open(tiny_run / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [10, 20, 30, 40]
  assert rows[-1]['loss'] < 0.5 * rows[0]['loss']
  assert all(r['utterances_per_second'] > 0 for r in rows)
  results = json.load(open(tiny_run / 'results.json'))
  assert 0 < results['trainable_fraction'] < 0.5
  assert results['skipped_steps'] == 0


def test_train_writes_the_metrics_for_tensorboard(tiny_run):
  tf = pytest.importorskip('tensorflow')
  scalars = {}
  for path in glob.glob(str(tiny_run / 'tensorboard' / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = float(
            tf.make_ndarray(value.tensor))
        assert value.metadata.plugin_data.plugin_name == 'scalars'
  rows = [json.loads(line) for line in open(tiny_run / 'metrics.jsonl')]
  for key in ('loss', 'grad_norm', 'learning_rate', 'steps_per_second'):
    assert scalars[f'train/{key}'] == {
        r['step']: pytest.approx(r[key], rel=1e-6) for r in rows}, key


def evaluate(*args):
  result = run('launch/evaluate.py', *args)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


def test_evaluate_scores_the_newest_checkpoint_of_a_run(tiny_run, tmp_path):
  trained = evaluate(f'--workdir={tiny_run}')  # the config saved with the run
  assert trained == json.load(open(tiny_run / 'eval_test.json'))
  assert trained['step'] == 40 and trained['evaluated'] == 'checkpoint'
  assert trained['num_utterances'] == random_task.RANDOM_EVAL_BATCHES * 32
  assert trained['base_fingerprint'] == json.load(open(tiny_run / 'results.json'))[
      'base_fingerprint']
  # The same base with the head it started from: the trained adapters and head are what help.
  config = tiny_config_file()
  model = build.create_model(config, sharding.make_mesh(**config.mesh))
  checkpoint.save_state(str(tmp_path / 'head'), nnx.state(model.head))
  untrained = evaluate(f'--workdir={tmp_path / "base"}', '--config=configs/tiny.py',
                       f'--head={tmp_path / "head"}')
  assert untrained['evaluated'] == 'base' and untrained['step'] is None
  assert trained['wer'] < 0.5 * untrained['wer'], (trained['wer'], untrained['wer'])


def test_evaluate_refuses_what_it_cannot_evaluate(tiny_run, tmp_path):
  other_base = tiny_config_file()
  other_base.seed = 1
  with pytest.raises(checkpoint.CheckpointError, match='trained on base'):
    evaluation.evaluate(other_base, str(tiny_run))
  with pytest.raises(checkpoint.CheckpointError, match='nothing to evaluate.*--head='):
    evaluation.evaluate(tiny_config_file(), str(tmp_path))
  assert not (tmp_path / 'eval_test.json').exists()


def tiny_config_file():
  """configs/tiny.py as launch programs load it."""
  spec = importlib.util.spec_from_file_location('tiny', os.path.join(ROOT, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_a_run_trained_on_four_devices_is_evaluated_and_exported_on_one(tiny_run, tmp_path):
  """The program builds its mesh from the devices it has, not from the run's 2 x 2 mesh."""
  from tpa_jax.checkpoint import adapter_file  # pylint: disable=import-outside-toplevel
  on_one = run('launch/evaluate.py', f'--workdir={tiny_run}', '--split=test', devices=1)
  assert on_one.returncode == 0, on_one.stderr[-3000:]
  one, four = json.loads(on_one.stdout.splitlines()[-1]), evaluate(f'--workdir={tiny_run}')
  assert one['step'] == four['step'] == 40
  assert one['num_utterances'] == four['num_utterances']
  assert abs(one['wer'] - four['wer']) <= 0.01, (one['wer'], four['wer'])
  outputs = {}
  for devices in (1, 4):
    out = tmp_path / f'adapters-{devices}.safetensors'
    result = run('launch/export.py', f'--workdir={tiny_run}', '--kind=adapter', f'--output={out}',
                 devices=devices)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[devices], _ = adapter_file.read_adapters(str(out))
  assert outputs[1].keys() == outputs[4].keys()
  for name in outputs[1]:
    np.testing.assert_array_equal(outputs[1][name], outputs[4][name], err_msg=name)


def test_evaluate_takes_an_adapter_export_over_its_base(tiny_run, tmp_path):
  out = tmp_path / 'adapters.safetensors'
  result = run('launch/export.py', f'--workdir={tiny_run}', '--kind=adapter', f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  from_export = evaluate(f'--workdir={tmp_path / "eval"}', '--config=configs/tiny.py',
                         f'--adapters={out}')
  from_run = json.load(open(tiny_run / 'eval_test.json'))
  assert from_export['evaluated'] == 'adapters' and from_export['step'] is None
  assert from_export['wer'] == pytest.approx(from_run['wer'], abs=0.01)
  # Without --workdir (the form the checkpoints guide gives): evaluated beside the export.
  beside = run('launch/evaluate.py', '--config=configs/tiny.py', f'--adapters={out}')
  assert beside.returncode == 0, beside.stderr[-3000:]
  assert f'go to {tmp_path / "adapters.eval"}' in beside.stderr
  assert json.loads(beside.stdout.splitlines()[-1]) == from_export
  assert json.load(open(tmp_path / 'adapters.eval' / 'eval_test.json')) == from_export
  # The same refusals as attaching: a differing field is named, without a traceback.
  refused = run('launch/evaluate.py', f'--workdir={tmp_path / "eval"}', '--config=configs/tiny.py',
                f'--adapters={out}', '--config.adapter.bottleneck=8')
  assert refused.returncode == 1
  assert 'adapter.bottleneck: export 64, config 8' in refused.stderr
  assert 'Traceback' not in refused.stderr


@pytest.mark.parametrize('args,message', [
    (('--config.train.nmu_steps=3',), "config.train has no field 'nmu_steps'"),
    (('--config.adapter.placement=sideways',), "adapter.placement='sideways': accepted values"),
    (('--config.base.path=/nonexistent/base',), 'no checkpoint at /nonexistent/base'),
    (('--workdir_is_a_file',), 'is a file, not a directory'),
])
def test_user_mistakes_end_with_a_message_not_a_traceback(tmp_path, args, message):
  workdir = tmp_path / 'run'
  if args == ('--workdir_is_a_file',):
    workdir.write_text('not a directory')
    args = ()
  result = run('launch/train.py', '--config=configs/tiny.py', f'--workdir={workdir}', *args)
  assert result.returncode == 1, result.stderr[-3000:]
  assert message in result.stderr, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize('program,args,message', [
    ('launch/evaluate.py', ('--config=configs/tiny.py',),
     '--workdir is required to evaluate a run'),
    ('launch/train.py', ('--config=configs/tiny.py:model', '--workdir=unused'),
     "--config=configs/tiny.py:model: config argument 'model' is not key=value"),
    ('launch/train.py', ('--config=configs/tiny.py:blocks=2,3,9', '--workdir=unused'),
     '--config=configs/tiny.py:blocks=2,3,9: adapter.blocks=[2, 3, 9]: 9 is not a block of a '
     'model with 4 blocks'),
])
def test_mistakes_before_the_run_starts_are_one_line(program, args, message):
  result = run(program, *args, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(f'error: {message}'), result.stderr
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert not os.path.exists(os.path.join(ROOT, 'unused'))


@pytest.mark.parametrize('override,message', [
    ('--config.train.nmu_steps=3', 'nmu_steps'),
    ('--config.adapter.placement=sideways', "adapter.placement='sideways'"),
    ('--config.mesh.fsdp=3', 'does not divide 4 devices'),
])
def test_train_rejects_bad_config_with_a_named_error(tmp_path, override, message):
  result = run('launch/train.py', '--config=configs/tiny.py', f'--workdir={tmp_path}', override)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / 'metrics.jsonl').exists()


@pytest.mark.slow(seconds=27)
def test_step_cost_benchmark_prints_every_field():
  result = run('benchmarks/step_cost.py', '--preset=tiny', '--frames=32', '--steps=1',
               '--methods=full,tpa_upper_half', timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r['method'] for r in rows] == ['full', 'tpa_upper_half']
  fields = {'method', 'trainable_params', 'total_params', 'lowered_flops', 'flops_ratio_vs_full',
            'weight_state_bytes', 'weight_state_ratio_vs_full', 'temp_bytes',
            'step_seconds_median', 'step_time_ratio_vs_full'}
  assert all(fields <= set(r) for r in rows)
  upper = rows[1]
  assert upper['trainable_params'] < upper['total_params']
  assert upper['flops_ratio_vs_full'] < 1 and upper['weight_state_ratio_vs_full'] < 1


def test_step_profile_charges_every_equation_to_the_code_that_made_it():
  groups = {}
  for impl in ('xla', 'chunked'):
    result = run('benchmarks/step_profile.py', '--preset=tiny', '--seconds=2',
                 '--per_device_batch=1', '--top=100', f'--attention_impl={impl}', timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    *rows, total = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == total['groups']  # --top=100 prints every group
    # The groups add up to the whole step as the planner counts it: nothing lost or twice.
    assert sum(r['flops'] for r in rows) == total['flops'] == total['flops_counted_whole']
    groups[impl] = {r['group']: r for r in rows}
  xla, chunked = groups['xla'], groups['chunked']
  assert xla['nn/conformer.py:ConformerBlock._ffn']['flops'] > 0  # Dense charged to its caller
  assert not [g for g in xla if g.startswith(('nn/layers.py', 'sharding.py'))]
  assert xla['nn/attention.py:relative_shift']['bytes'] > 0  # the [B, H, T, T] shift
  assert 'nn/attention.py:relative_shift' not in chunked
  assert chunked['nn/chunked_attention.py:chunked_attention']['flops'] > 0


@pytest.mark.slow(seconds=204)
def test_accelerator_script_measures_every_part_at_the_tiny_preset(tmp_path):
  """The device script's code path on CPU: every method and every implementation of the train
  step (each implementation with TPA), the attention alone against xla, and serving, all in its
  JSON lines and in $OUT."""
  env = dict(os.environ, OUT=str(tmp_path), XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run([sys.executable, 'benchmarks/accelerator.py', '--preset=tiny'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert rows == [json.loads(line) for line in (tmp_path / 'accelerator.jsonl').open()]
  assert not [r for r in rows if 'error' in r]
  steps = {(r['method'], r['attention_impl']): r for r in rows if 'step_seconds_median' in r}
  assert set(steps) == {('tpa', 'xla'), ('tpa', 'chunked'), ('tpa', 'pallas'), ('full', 'xla'),
                        ('tpa_upper_half', 'pallas')}
  # cuDNN cannot run on a CPU: what runs in its place (xla) was measured already for TPA, and
  # its line says so instead of spending the time again.
  same = {(r['method'], r['attention_impl']): r for r in rows if 'same_as' in r and 'method' in r}
  assert set(same) == {('tpa', 'cudnn')}
  assert {(r['attention_ran'], r['same_as']) for r in same.values()} == {('xla', 'xla')}
  assert {r['attention_ran'] for (_, i), r in steps.items() if i != 'xla'} == {'chunked', 'pallas'}
  for row in steps.values():
    assert row['model_flops'] > 0 and row['audio_seconds_per_second'] > 0
    assert row['peak_tflops'] is None and row['mfu'] is None  # no bf16 peak is known for a CPU
  # One model-FLOP count per method, whichever attention runs.
  assert steps['tpa', 'xla']['model_flops'] == steps['tpa', 'chunked']['model_flops']
  assert steps['tpa_upper_half', 'pallas']['model_flops'] < steps['tpa', 'xla']['model_flops']
  for impl in ('chunked', 'pallas'):
    alone = [r for r in rows if r.get('benchmark') == 'attention' and
             r['attention_impl'] == impl]
    assert alone and alone[0]['output_max_rel_diff'] < 2e-2, impl
    assert alone[0]['input_grad_max_rel_diff'] < 2e-2, impl
  assert {'mixed_vs_single', 'shared_prefix_vs_separate'} <= {r.get('metric') for r in rows}
  # One profiler trace per method and implementation measured, for the device's own profile.
  traced = {p.relative_to(tmp_path / 'trace').parts[0]
            for p in (tmp_path / 'trace').rglob('*.xplane.pb')}
  assert traced == {f'{m}-{i}' for m, i in steps}
