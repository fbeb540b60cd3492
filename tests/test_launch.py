"""The launch programs, run as users run them: a subprocess with absl flags."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_train_writes_metrics_and_learns(tmp_path):
  result = run('launch/train.py', '--config=configs/tiny.py', f'--workdir={tmp_path}',
               '--config.mesh.data=2', '--config.mesh.fsdp=2')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [10, 20, 30, 40]
  assert rows[-1]['loss'] < 0.5 * rows[0]['loss']
  results = json.load(open(tmp_path / 'results.json'))
  assert 0 < results['trainable_fraction'] < 0.5
  assert results['skipped_steps'] == 0


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
