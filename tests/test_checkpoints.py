"""Checkpoints: bases across meshes, fingerprints, and run checkpoints that resume exactly."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tpa_jax import checkpoint
from tpa_jax import sharding
from tpa_jax.checkpoint import adapter_file
from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.nn import build
from tpa_jax.nn.params import AdapterParam, HeadParam
from conftest import logged_steps, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, EVERY = 24, 4


# -- bases ----------------------------------------------------------------------------------------

def test_base_restores_into_another_mesh_without_gathering(tmp_path):
  config = tiny_config('tpa')
  data4 = sharding.make_mesh(data=4, fsdp=1, tensor=1)
  saved = build.create_model(config, data4)
  checkpoint.save_state(str(tmp_path / 'base'), checkpoint.base_state(saved))

  fsdp_tensor = sharding.make_mesh(data=1, fsdp=2, tensor=2)
  config.seed = 1  # different initial weights, to be overwritten
  loaded = build.create_model(config, fsdp_tensor)
  target = checkpoint.base_state(loaded)
  before = jax.tree.map(lambda x: x.sharding, target)
  checkpoint.load_base(str(tmp_path / 'base'), loaded)
  after = checkpoint.base_state(loaded)
  for a, b in zip(jax.tree.leaves(checkpoint.base_state(saved)), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Restored straight into the new mesh's shardings, some of them split over fsdp x tensor.
  assert jax.tree.map(lambda x: x.sharding, after) == before
  assert any(x.sharding.mesh.shape == fsdp_tensor.shape and not x.is_fully_replicated
             for x in jax.tree.leaves(after))
  # The fingerprint depends on the weights, not on how they are laid out.
  assert (checkpoint.weights_digest(checkpoint.base_state(saved))
          == checkpoint.weights_digest(after))


@pytest.mark.parametrize('method', ['tpa', 'full'])
def test_a_bf16_base_loads_in_bf16_without_initialising_it(method, tmp_path, mesh1):
  """The trainer restores a bf16 base straight into bf16 frozen weights (bit-equal to what was
  saved; trainable ones in float32 for full fine-tuning), initialises only adapters and head
  (as the seed would), and fingerprints the base as stored."""
  from tpa_jax.train import partition  # pylint: disable=import-outside-toplevel
  from tpa_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  config = tiny_config(method)
  saved = build.create_model(config, mesh1)
  base = partition.cast(checkpoint.base_state(saved), jnp.bfloat16)
  checkpoint.save_state(str(tmp_path / 'base'), base)
  config.base.path = str(tmp_path / 'base')
  config.seed = 7  # the base's weights must come from the checkpoint, not from this seed
  trainer = trainer_lib.from_config(config, mesh1)
  model = trainer.model()
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(base)[0],
                               jax.tree.leaves(checkpoint.base_state(model))):
    got = np.asarray(got)
    assert got.dtype == (np.float32 if method == 'full' else jnp.bfloat16), path
    np.testing.assert_array_equal(got.astype(np.float32), np.asarray(want, np.float32),
                                  err_msg=jax.tree_util.keystr(path))
  if method == 'tpa':
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(trainer.frozen))
    seeded = build.create_model(config, mesh1)  # adapters and head as seed 7 makes them
    for a, b in zip(jax.tree.leaves(nnx.state(seeded, nnx.Any(AdapterParam, HeadParam))),
                    jax.tree.leaves(nnx.state(model, nnx.Any(AdapterParam, HeadParam)))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert trainer.base_fingerprint['weights'] == checkpoint.weights_digest(base)


# A process that saves a small base twice (values 1 then 2) and is killed with SIGKILL inside one
# window of the second save: while the new copy is written, once the old copy has moved aside,
# or once the new copy is in place but the old one is not yet deleted.
_SAVE_AND_DIE = """
import os, signal, sys
import jax.numpy as jnp
from flax import nnx
from tpa_jax import checkpoint
from tpa_jax.checkpoint import base as base_lib
path, window = sys.argv[1], sys.argv[2]
state = lambda v: nnx.State({'w': nnx.Param(jnp.full((64,), v, jnp.float32))})
if window != 'first_write':
  checkpoint.save_state(path, state(1.0), metadata={'value': 1})
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_write = os.replace, base_lib._write_json
def replace(src, dst):
  real_replace(src, dst)
  if (window, dst) in (('old_moved', path + '.old'), ('new_in_place', path)):
    die()
def write_json(file, value):
  if window in ('writing', 'first_write') and file.startswith(path + '.saving'):
    die()  # the arrays are written, the marker of a complete copy is not
  real_write(file, value)
os.replace, base_lib._write_json = replace, write_json
checkpoint.save_state(path, state(2.0), metadata={'value': 2})
"""


@pytest.mark.parametrize('window,survivor,meta', [
    ('writing', 1.0, {'value': 1}), ('old_moved', 2.0, {'value': 2}),
    ('new_in_place', 2.0, {'value': 2}),
    # A first save whose arrays were written but not its metadata: the arrays are kept.
    ('first_write', 2.0, None)])
def test_a_crash_while_replacing_a_base_leaves_a_complete_base(window, survivor, meta, tmp_path,
                                                                caplog):
  path = str(tmp_path / 'base')
  result = subprocess.run([sys.executable, '-c', _SAVE_AND_DIE, path, window], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  if window in ('old_moved', 'first_write'):
    assert not os.path.exists(path)  # the window was really hit
  # Reading the metadata reads the complete copy and moves nothing (configs read it before JAX
  # starts, on every host).
  listing = sorted(os.listdir(tmp_path))
  assert checkpoint.read_metadata(path) == meta
  assert sorted(os.listdir(tmp_path)) == listing
  target = nnx.State({'w': nnx.Param(jnp.zeros((64,), jnp.float32))})
  with caplog.at_level('WARNING'):
    restored = checkpoint.restore_state(path, target)  # recovers
  np.testing.assert_array_equal(np.asarray(restored['w'][...]), survivor)
  assert checkpoint.read_metadata(path) == meta
  if meta is not None:
    assert json.load(open(path + '.json')) == meta  # the readable copy follows
  assert sorted(os.listdir(tmp_path)) == (['base', 'base.json'] if meta else ['base'])
  assert any(f'checkpoint {path}:' in r.getMessage() for r in caplog.records), caplog.text
  # And the next save replaces it as usual.
  checkpoint.save_state(path, nnx.State({'w': nnx.Param(jnp.full((64,), 3.0))}))
  np.testing.assert_array_equal(np.asarray(checkpoint.restore_state(path, target)['w'][...]), 3.0)


def test_a_base_whose_only_save_crashed_mid_write_is_named_half_written(tmp_path):
  path = str(tmp_path / 'base')
  # What a save killed while orbax wrote its arrays leaves: no commit marker, no metadata.
  partial = tmp_path / 'base.saving.orbax-checkpoint-tmp-1'
  partial.mkdir()
  (partial / '_CHECKPOINT_METADATA').write_text('{')
  target = nnx.State({'w': nnx.Param(jnp.zeros((64,), jnp.float32))})
  with pytest.raises(checkpoint.CheckpointError, match=r'no checkpoint at .*removed the '
                     r'half-written copy .*base.saving.orbax-checkpoint-tmp-1 of an interrupted '
                     r'save'):
    checkpoint.restore_state(path, target)
  assert os.listdir(tmp_path) == []


def test_a_base_of_another_model_is_refused_by_name(tmp_path, mesh1):
  checkpoint.save_state(str(tmp_path / 'base'),
                        checkpoint.base_state(build.create_model(tiny_config('full'), mesh1)))
  other = build.create_model(tiny_config('full', **{'model.ffn_dim': 48}), mesh1)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'does not fit this model: .*ffn1/up/kernel: stored \(4, 32, 64\), '
                           r'expected \(4, 32, 48\)'):
    checkpoint.load_base(str(tmp_path / 'base'), other)


def test_weights_digest_sees_one_changed_or_moved_value(mesh22):
  model = build.create_model(tiny_config('tpa'), mesh22)
  state = checkpoint.base_state(model)
  digest = checkpoint.weights_digest(state)
  flat = nnx.to_flat_state(state)
  path, var = next((p, v) for p, v in flat  # (a random matrix: two different neighbours)
                   if v[...].ndim == 2 and v[...][0, 0] != v[...][0, 1])
  original = var[...]
  changed = original.at[0, 0].set(np.nextafter(original[0, 0], np.float32(np.inf)))
  var.set_value(changed)
  assert checkpoint.weights_digest(state) != digest, path
  swapped = original.at[0, 0].set(original[0, 1]).at[0, 1].set(original[0, 0])
  var.set_value(swapped)
  assert checkpoint.weights_digest(state) != digest
  var.set_value(original)
  assert checkpoint.weights_digest(state) == digest


# -- run checkpoints through launch/train.py ------------------------------------------------------

def launch(workdir, *overrides, wait=True):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  args = [sys.executable, 'launch/train.py', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.train.num_steps={NUM_STEPS}', f'--config.checkpoint.every_steps={EVERY}',
          '--config.train.log_every_steps=2', '--config.mesh.data=2', '--config.mesh.fsdp=2',
          *overrides]
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(args, proc.returncode, out, err)


def committed(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d)
                if s.isdigit() and os.path.exists(os.path.join(d, s, 'commit_success.txt')))


def final_state(workdir, step=NUM_STEPS):
  with ocp.StandardCheckpointer() as c:
    restored = c.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return dict(jax.tree_util.tree_flatten_with_path(restored)[0])


def assert_bit_identical(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]),
                                  err_msg=jax.tree_util.keystr(key))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = launch(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_uninterrupted_run_saves_the_adapter_state_with_its_run(uninterrupted):
  steps = committed(uninterrupted)
  assert steps == [NUM_STEPS - 2 * EVERY, NUM_STEPS - EVERY, NUM_STEPS]  # keep=3
  state = final_state(uninterrupted)
  names = {jax.tree_util.keystr(k) for k in state}
  assert any('adapter' in n for n in names) and any('head' in n for n in names)
  # Adapter-only: no frozen encoder weight is in the run checkpoint.
  assert not any('adapter' not in n and 'head' not in n and "'trainable'" in n for n in names)
  assert int(np.asarray(state[next(k for k in state if "'step'" in jax.tree_util.keystr(k))])) \
      == NUM_STEPS
  step_dir = os.path.join(uninterrupted, 'checkpoints', str(NUM_STEPS))
  run = json.load(open(os.path.join(step_dir, 'run', 'metadata')))
  assert run['adapter'] == {'placement': 'ff_parallel', 'blocks': 'all', 'bottleneck': 64}
  assert run['config']['train']['num_steps'] == NUM_STEPS
  assert len(run['base_fingerprint']['id']) == 16
  assert json.load(open(os.path.join(step_dir, 'data', 'metadata'))) == {'next_index': NUM_STEPS}


def test_sigkill_at_a_random_step_then_relaunch_is_bit_identical(uninterrupted, tmp_path):
  seed = int(time.time())
  kill_at = random.Random(seed).randrange(EVERY + 1, NUM_STEPS - 2 * EVERY)
  proc = launch(tmp_path, wait=False)
  deadline = time.time() + 240
  while not logged_steps(tmp_path) or max(logged_steps(tmp_path)) < kill_at:
    assert proc.poll() is None and time.time() < deadline, f'seed {seed}: run ended early'
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = committed(tmp_path)  # (a save still in flight at the kill does not count)
  assert not killed_at or max(killed_at) < NUM_STEPS, f'seed {seed}: killed too late'

  result = launch(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  if killed_at:
    assert f'resumed from step {max(killed_at)}' in result.stderr, f'seed {seed}'
  assert 'moved step folder' not in result.stderr  # only committed steps existed
  assert_bit_identical(final_state(uninterrupted), final_state(tmp_path))
  # The metrics log has each step once, in order.
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'metrics.jsonl')]
  assert steps == list(range(2, NUM_STEPS + 1, 2)), f'seed {seed}'


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(uninterrupted, tmp_path):
  proc = launch(tmp_path, wait=False)
  deadline = time.time() + 240
  while not committed(tmp_path):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  results = json.load(open(tmp_path / 'results.json'))
  assert results['preempted'] is True
  assert max(committed(tmp_path)) == results['step'] < NUM_STEPS
  assert launch(tmp_path).returncode == 0
  assert_bit_identical(final_state(uninterrupted), final_state(tmp_path))


def test_corrupt_latest_step_is_reported_and_the_previous_one_used(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-r', str(uninterrupted), str(workdir)], check=True)
  latest = os.path.join(workdir, 'checkpoints', str(NUM_STEPS), 'state')
  for root, _, files in os.walk(latest):
    for name in files:
      if not name.startswith('_'):
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(max(os.path.getsize(f.name) // 2, 1))
  result = launch(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'checkpoint step {NUM_STEPS}' in result.stderr and 'corrupt' in result.stderr
  assert f'resumed from step {NUM_STEPS - EVERY}' in result.stderr
  assert_bit_identical(final_state(uninterrupted), final_state(workdir))


@pytest.mark.parametrize('override,message', [
    ('--config.adapter.bottleneck=16',
     "adapter.bottleneck: checkpoint 64, config 16"),
    ('--config.seed=1', "trained on base"),
])
def test_resuming_with_another_base_or_adapter_shape_is_refused(uninterrupted, tmp_path,
                                                                 override, message):
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-r', str(uninterrupted), str(workdir)], check=True)
  result = launch(workdir, override)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-3000:]
  if 'seed' in override:  # both fingerprints are named
    saved = json.load(open(os.path.join(workdir, 'checkpoints', str(NUM_STEPS), 'run',
                                        'metadata')))['base_fingerprint']['id']
    assert saved in result.stderr and "this run's base is" in result.stderr


def test_workdir_problems_are_named(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='parent of workdir .* does not exist'):
    checkpoint.check_workdir(str(tmp_path / 'missing' / 'run'))
  assert checkpoint.check_workdir(str(tmp_path / 'new')) == str(tmp_path / 'new')
  if os.geteuid() != 0:  # root writes through permission bits
    os.chmod(tmp_path / 'new', 0o500)
    with pytest.raises(checkpoint.CheckpointError, match='not writable'):
      checkpoint.check_workdir(str(tmp_path / 'new'))


# -- exports --------------------------------------------------------------------------------------

def test_adapter_export_reattaches_onto_the_same_base_only(uninterrupted, tmp_path):
  from tpa_jax.serve import export  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'adapters.safetensors'
  result = subprocess.run([sys.executable, 'launch/export.py', f'--workdir={uninterrupted}',
                           '--kind=adapter', f'--output={out}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  tensors, meta = adapter_file.read_adapters(str(out))
  assert (meta['placement'], meta['blocks'], meta['bottleneck']) == ('ff_parallel', 'all', '64')
  assert all('adapter' in k or 'head' in k for k in tensors)

  config, live, trainable, info, step = export.load_run(str(uninterrupted))
  assert step == NUM_STEPS and meta['base_fingerprint'] == info['base_fingerprint']['id']
  mesh = sharding.make_mesh(**config.mesh)
  fresh = build.create_model(config, mesh)  # the same base (seed), untrained adapters and head
  features = np.random.default_rng(0).normal(size=(4, 48, 80)).astype(np.float32)
  mask = np.ones((4, 48), bool)
  assert not np.allclose(fresh(features, mask)[0], live(features, mask)[0])
  fingerprint = checkpoint.base_fingerprint(config.model, fresh)
  adapter_file.attach_adapters(str(out), fresh, spec_lib.from_config(config, fingerprint['id']))
  attached = adapter_file.flat_arrays(nnx.state(fresh))
  for name, array in adapter_file.flat_arrays(trainable).items():
    np.testing.assert_array_equal(attached[name], array, err_msg=name)
  # (The live model keeps its frozen weights in bf16, the fresh one in f32.)
  np.testing.assert_allclose(fresh(features, mask)[0], live(features, mask)[0], atol=0.05)

  config.seed = 1
  other = build.create_model(config, mesh)
  other_fp = checkpoint.base_fingerprint(config.model, other)
  with pytest.raises(checkpoint.CheckpointError) as error:
    adapter_file.attach_adapters(str(out), other, spec_lib.from_config(config, other_fp['id']))
  assert meta['base_fingerprint'] in str(error.value) and other_fp['id'] in str(error.value)


def test_serving_bundle_runs_without_tpa_jax_and_matches_the_live_model(uninterrupted, tmp_path):
  from tpa_jax.serve import export  # pylint: disable=import-outside-toplevel
  bundle = tmp_path / 'serving'
  result = subprocess.run([sys.executable, 'launch/export.py', f'--workdir={uninterrupted}',
                           '--kind=serving', f'--output={bundle}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(bundle)) == ['function.jaxexport', 'manifest.json',
                                        'weights.safetensors']
  features = np.random.default_rng(1).normal(size=(3, 40, 80)).astype(np.float32)
  np.save(tmp_path / 'features.npy', features)
  loader = os.path.join(ROOT, 'tpa_jax', 'serve', 'serving_loader.py')
  check = ("import runpy, sys; sys.argv = [{l!r}, {b!r}, {f!r}, {o!r}]; "
           "runpy.run_path({l!r}, run_name='__main__'); "
           "assert not any(m.startswith('tpa_jax') for m in sys.modules), 'imported tpa_jax'")
  result = subprocess.run(
      [sys.executable, '-c', check.format(l=loader, b=str(bundle),
                                          f=str(tmp_path / 'features.npy'),
                                          o=str(tmp_path / 'logits.npy'))],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})
  assert result.returncode == 0, result.stderr[-3000:]
  _, live, _, _, _ = export.load_run(str(uninterrupted))
  expected, _ = live(features, np.ones(features.shape[:2], bool))
  np.testing.assert_allclose(np.load(tmp_path / 'logits.npy'), np.asarray(expected),
                             rtol=1e-5, atol=1e-5)


# -- adapter specs: every differing field is refused by name, and nothing is touched -------------

SPEC_FIELDS = [
    ('adapter.placement', 'ff_sequential'), ('adapter.blocks', '2:4'),
    ('adapter.bottleneck', 16), ('adapter.residual_weight', 0.5),
    ('adapter.activation', 'gelu'), ('adapter.use_norm', False), ('adapter.up_init', 'normal'),
    ('train.trainable', 'full'), ('head.kind', 'classification'), ('head.vocab_size', 7),
    ('base.path', None),
]


def _tree_listing(root):
  return sorted((os.path.relpath(d, root), tuple(sorted(files)))
                for d, _, files in os.walk(root))


@pytest.fixture(scope='module')
def exported(uninterrupted, tmp_path_factory):
  """The run's adapter export, its config and its spec."""
  from tpa_jax.serve import export  # pylint: disable=import-outside-toplevel
  out = str(tmp_path_factory.mktemp('export') / 'adapters.safetensors')
  export.export_adapters(str(uninterrupted), out, sharding.make_mesh(devices=jax.devices()[:1]))
  info = checkpoint.RunCheckpointer(os.path.join(uninterrupted, 'checkpoints'), async_save=False,
                                    read_only=True).newest_run_info()
  return out, ml_collections.ConfigDict(info['config']), checkpoint.saved_spec(info)


def _differing_spec(config, saved, field, value):
  config = ml_collections.ConfigDict(config.to_dict())
  if field == 'base.path':
    return spec_lib.from_config(config, 'another-base-fingerprint')
  section, name = field.split('.')
  config[section][name] = value
  return spec_lib.from_config(config, saved.base_fingerprint)


@pytest.mark.parametrize('field,value', SPEC_FIELDS)
def test_resuming_with_any_differing_spec_field_is_refused_by_name(uninterrupted, exported,
                                                                    tmp_path, field, value):
  _, config, saved = exported
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-r', str(uninterrupted), str(workdir)], check=True)
  before = _tree_listing(workdir)
  current = _differing_spec(config, saved, field, value)
  directory = str(workdir / 'checkpoints')
  reader = checkpoint.RunCheckpointer(directory, async_save=False)
  target = {'w': jnp.zeros((2,))}  # never read: the spec is checked first
  with pytest.raises(checkpoint.SpecMismatchError) as error:
    reader.restore_latest(target, check=lambda i: checkpoint.check_run(i, current, directory))
  reader.close()
  message = str(error.value)
  if field == 'base.path':
    assert f'trained on base {saved.base_fingerprint}' in message
  else:
    assert f'{field}: checkpoint ' in message, message
  assert 'Nothing was read, moved or deleted' in message
  assert _tree_listing(workdir) == before  # no step moved to discarded/, nothing deleted


@pytest.mark.parametrize('field,value', SPEC_FIELDS)
def test_attaching_with_any_differing_spec_field_is_refused_before_reading(exported, field,
                                                                            value, monkeypatch):
  path, config, saved = exported
  current = _differing_spec(config, saved, field, value)

  def no_arrays(*_):
    raise AssertionError('an array was read before the spec was checked')
  monkeypatch.setattr(adapter_file, 'read_adapters', no_arrays)
  with pytest.raises(checkpoint.SpecMismatchError) as error:
    adapter_file.attach_adapters(path, None, current)
  expected = (f'trained on base {saved.base_fingerprint}' if field == 'base.path'
              else f'{field}: export ')
  assert expected in str(error.value), str(error.value)


def test_block_selections_compare_resolved(exported):
  """'0:4', '0,1,2,3' and 'all' are the same blocks of a 4-block model: no refusal."""
  _, config, saved = exported
  for blocks in ('0:4', '0,1,2,3', '[3, 2, 1, 0]'):
    spec_lib.check(saved, _differing_spec(config, saved, 'adapter.blocks', blocks), what='x')


def test_attaching_an_export_that_leaves_a_variable_unset_is_refused(exported, tmp_path):
  from safetensors import numpy as safetensors_np  # pylint: disable=import-outside-toplevel
  path, config, saved = exported
  tensors, metadata = adapter_file.read_adapters(path)
  dropped = next(name for name in tensors if 'head' in name)
  partial = str(tmp_path / 'partial.safetensors')
  safetensors_np.save_file({k: v for k, v in tensors.items() if k != dropped}, partial, metadata)
  model = build.create_model(config, sharding.make_mesh(devices=jax.devices()[:1]))
  before = adapter_file.flat_arrays(nnx.state(model))
  with pytest.raises(checkpoint.SpecMismatchError, match=f'leaves unset: .*{dropped}'):
    adapter_file.attach_adapters(partial, model, saved)
  for name, array in adapter_file.flat_arrays(nnx.state(model)).items():  # nothing was set
    np.testing.assert_array_equal(array, before[name], err_msg=name)


def test_an_export_never_replaces_a_directory_that_is_not_its_own(uninterrupted, tmp_path):
  from tpa_jax.serve import export  # pylint: disable=import-outside-toplevel
  (tmp_path / 'keep.txt').write_text('a run lives here')
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  with pytest.raises(checkpoint.CheckpointError, match='is a directory; pass a file path'):
    export.export_adapters(str(uninterrupted), str(tmp_path), mesh)
  with pytest.raises(checkpoint.CheckpointError, match='exists and is not a serving bundle'):
    export.export_serving(str(uninterrupted), str(tmp_path), ('cpu',), mesh)
  assert (tmp_path / 'keep.txt').read_text() == 'a run lives here'
