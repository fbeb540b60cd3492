"""Several JAX processes as one job, on localhost: 2 processes x 2 CPU devices (gloo collectives)
train, are preempted, save, resume, and end where one process on 4 devices ends.

Each process is a real `launch/train.py` run with --coordinator_address/--num_processes/
--process_id. When one of them hangs or dies the others may wait in a collective: every wait
here has a deadline, after which all processes are killed and the test fails with their logs.
"""

import json
import re
import os
import signal
import time

import numpy as np
import pytest

from tpa_jax.data import pipeline
from tpa_jax.data import random_task
from tpa_jax.programs import distributed

from conftest import Job, built_once, host_arrays, logged_steps, tiny_config

NUM_STEPS = 16
DEADLINE_SECONDS = 480
COMMON = ('--config=configs/tiny.py', '--config.mesh.data=2', '--config.mesh.fsdp=2',
          # A constant rate after warmup: the rate at a step does not depend on num_steps, so
          # a run stopped early and resumed to NUM_STEPS follows the same path.
          '--config.optim.schedule=constant', '--config.train.log_every_steps=2',
          '--config.checkpoint.every_steps=10',
          # Layers unrolled: a layer scan's backward collectives would run beside the step's
          # top-level gradient all-reduce, entered in different orders by different devices,
          # which the CPU runtime can deadlock on (and gloo can mismatch) when threads are few.
          '--config.model.scan_layers=False')


def train_job(log_dir, name):
  return Job(log_dir, name, 'launch/train.py', *COMMON)


def committed(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d)
                if s.isdigit() and os.path.exists(os.path.join(d, s, 'commit_success.txt')))


def saved_state(workdir, step):
  """The arrays of a saved TrainState as host arrays, whatever topology saved them."""
  return host_arrays(os.path.join(workdir, 'checkpoints', str(step), 'state'))


@pytest.fixture
def runs(tmp_path_factory):
  """A 2-process run preempted by a SIGTERM to process 1 alone, then relaunched to NUM_STEPS;
  and the same config in one process on 4 devices (run once per session)."""
  def build(base):
    two, one = str(base / 'two'), str(base / 'one')
    deadline = time.time() + DEADLINE_SECONDS
    reference = train_job(str(base), 'one-process').start(one, 4,
                                                    f'--config.train.num_steps={NUM_STEPS}')
    first = train_job(str(base), 'two-processes').start_processes(two, 2,
                                                            '--config.train.num_steps=1000')
    while not logged_steps(two) or max(logged_steps(two)) < 2:
      if time.time() > deadline or any(p.poll() is not None for p in first.procs):
        first.procs += reference.procs  # (killed with the others)
        first.fail('ended or hung before step 2')
      time.sleep(0.1)
    first.procs[1].send_signal(signal.SIGTERM)  # a maintenance event on one host only
    first.wait(deadline)
    saved = committed(two)
    results = json.load(open(os.path.join(two, 'results.json')))
    reference.wait(deadline)

    deadline = time.time() + DEADLINE_SECONDS
    resumed = train_job(str(base), 'resumed').start_processes(two, 2,
                                                        f'--config.train.num_steps={NUM_STEPS}')
    resumed.wait(deadline)
    return dict(two=two, one=one, saved=saved, results=results,
                first_logs=[first.log(i) for i in range(2)],
                resumed_logs=[resumed.log(i) for i in range(2)])
  return built_once(tmp_path_factory, 'multihost', build)[1]


@pytest.mark.slow(seconds=87)  # (when it is the test that builds `runs`)
def test_sigterm_to_one_process_stops_every_process_at_one_saved_step(runs):
  # The processes agree on the step through JAX's preemption service, a few steps after the
  # signal on a busy machine: the saves are the periodic ones before it, and that step last.
  results = runs['results']
  step = results['step']
  assert results['preempted'] is True and 2 < step < NUM_STEPS
  assert runs['saved'][-1] == step, runs['saved']
  assert all(s % 10 == 0 for s in runs['saved'][:-1]), runs['saved']
  for i in range(2):
    assert f'every process saves step {step}, then exits' in runs['first_logs'][i]


@pytest.mark.slow(seconds=85)
def test_resumed_two_process_run_equals_the_one_process_run(runs):
  for i in range(2):
    assert f'resumed from step {runs["results"]["step"]}' in runs['resumed_logs'][i]
  two, one = saved_state(runs['two'], NUM_STEPS), saved_state(runs['one'], NUM_STEPS)
  assert two.keys() == one.keys()
  for key in one:
    # Cross-process all-reduces sum in another order than one process's: equal up to float
    # rounding (a process reading the other's rows is off by ~1e-1).
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=5e-5, err_msg=key)
  assert any('adapter' in k for k in one) and any('head' in k for k in one)


def test_only_process_zero_writes_the_metrics(runs):
  # Each logged step once: process 1 wrote nothing, and the resumed run replaced what the
  # first one logged after its checkpoint.
  assert logged_steps(runs['two']) == list(range(2, NUM_STEPS + 1, 2))
  assert os.listdir(os.path.join(runs['two'], 'tensorboard'))


# -- in one process: the shards each process reads --------------------------------------------

def test_random_batches_give_each_process_its_own_rows():
  config = tiny_config()
  config.train.batch_size = 8
  whole = next(random_task.RandomBatches(config, 3, process_index=0, process_count=1))
  parts = [next(random_task.RandomBatches(config, 3, process_index=p, process_count=4))
           for p in range(4)]
  for key, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
  with pytest.raises(ValueError, match='train.batch_size=8 does not divide over 3 processes'):
    random_task.RandomBatches(config, 3, process_index=0, process_count=3)


@pytest.mark.parametrize('process_count', [2, 4])
def test_every_process_yields_as_many_batches_of_the_same_shapes(process_count):
  """No process may wait in a collective for a batch that another process never yields."""
  rng = np.random.default_rng(0)
  # Uneven buckets: many short utterances, few long ones, some unusable.
  lengths = np.concatenate([rng.integers(100, 1000, 150), rng.integers(1000, 4000, 30)])
  keep = rng.random(len(lengths)) > 0.1
  index = pipeline.SplitIndex(np.where(keep, lengths, 0), keep, {'too_long': int((~keep).sum())})
  buckets = (pipeline.Bucket(1000, 8), pipeline.Bucket(4000, 4))
  source = [{'id': i} for i in range(len(lengths))]

  def collate(examples, max_samples):
    return {'ids': np.array([e['id'] for e in examples]), 'max_samples': np.array(max_samples)}

  num_batches = 40  # several epochs
  streams = [list(pipeline.BatchLoader(source, index, buckets, collate, seed=1,
                                       num_batches=num_batches, process_index=p,
                                       process_count=process_count, num_threads=1))
             for p in range(process_count)]
  assert [len(s) for s in streams] == [num_batches] * process_count
  whole = pipeline.BatchLoader(source, index, buckets, collate, seed=1, num_batches=num_batches)
  for step, batches in enumerate(zip(*streams)):
    assert len({int(b['max_samples']) for b in batches}) == 1, step  # one bucket per step
    assert len({len(b['ids']) for b in batches}) == 1, step
    np.testing.assert_array_equal(np.concatenate([b['ids'] for b in batches]),
                                  whole.global_indices(step))


# -- flags ------------------------------------------------------------------------------------

def test_distributed_flags_single_host_and_tpu_detection(tmp_path):
  no_tpu = str(tmp_path / 'cpu')
  assert distributed.initialize_args(sysfs=no_tpu) is None
  assert distributed.initialize_args('10.0.0.2:1234', 4, 3, sysfs=no_tpu) == {
      'coordinator_address': '10.0.0.2:1234', 'num_processes': 4, 'process_id': 3}

  def pci(root, name, vendor, device, cls):
    d = tmp_path / root / 'bus' / 'pci' / 'devices' / name
    d.mkdir(parents=True)
    for field, value in (('vendor', vendor), ('device', device), ('class', cls)):
      (d / field).write_text(value + '\n')
    return str(tmp_path / root)

  gvnic = pci('gce', '0000:00:04.0', '0x1ae0', '0x0042', '0x020000')  # Google's network card
  assert distributed.tpu_chips(gvnic) == 0 and distributed.initialize_args(sysfs=gvnic) is None
  tpu = pci('tpu', '0000:00:05.0', '0x1ae0', '0x0063', '0x120000')  # a v5e chip
  assert distributed.tpu_chips(tpu) == 1
  assert distributed.initialize_args(sysfs=tpu) == {}  # JAX auto-detects the slice


@pytest.mark.parametrize('args,message', [
    (('localhost:1234', None, 0), 'missing: --num_processes'),
    ((None, 2, None), 'missing: --coordinator_address, --process_id'),
    (('localhost', 2, 0), "--coordinator_address='localhost': expected host:port"),
    (('localhost:99999', 2, 0), 'a port in 1..65535'),
    (('localhost:1234', 0, 0), '--num_processes=0: expected a positive integer'),
    (('localhost:1234', 2, 2), '--process_id=2: expected 0 .. 1'),
])
def test_bad_distributed_flags_are_named(args, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    distributed.initialize_args(*args, sysfs='/nonexistent')
