"""Adapter banks: a batch mixing tasks of different placements, blocks, bottlenecks and heads
gives every example what its own single-task model gives; frozen work below the lowest adapted
block is shared; slots are written without recompiling; tasks that do not fit are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ctc_batch, tiny_config, trained_task
from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.errors import SpecMismatchError
from tpa_jax.serve import bank as bank_lib
from tpa_jax.nn import build
from tpa_jax.nn.params import HeadParam

# name -> (method, overrides): placements, blocks, bottlenecks, norms, activations and heads
# that differ from task to task.
TASKS = {
    'tpa': ('tpa', {'adapter.bottleneck': 8, 'head.vocab_size': 12}),
    'serial': ('block_sequential', {'adapter.bottleneck': 4, 'adapter.blocks': '2:4',
                                    'adapter.activation': 'gelu', 'head.kind': 'classification',
                                    'head.num_classes': 3}),
    'lora': ('lora', {'adapter.bottleneck': 2, 'adapter.blocks': '1,3', 'adapter.lora_alpha': 4.0,
                      'adapter.lora_targets': 'q,v,out,ffn2', 'head.vocab_size': 9}),
    'ff_serial': ('ff_sequential', {'adapter.bottleneck': 6, 'adapter.blocks': '0',
                                    'head.vocab_size': 12}),
    'tpa_small': ('tpa', {'adapter.bottleneck': 3, 'adapter.blocks': '3',
                          'adapter.use_norm': False, 'adapter.residual_weight': 0.5,
                          'head.vocab_size': 7}),
    'head_only': ('head', {'head.kind': 'classification', 'head.num_classes': 5}),
}


@pytest.fixture(scope='module')
def tasks(mesh1):
  return {name: trained_task(*TASKS[name], mesh1, seed=3 + len(name)) for name in TASKS}


def filled_bank(tasks, names, capacity=8):
  specs = [tasks[n][2] for n in names]
  layout = bank_lib.layout_for(specs, tasks[names[0]][0].model, capacity=capacity)
  bank = bank_lib.empty(layout)
  write = jax.jit(bank_lib.write_slot, donate_argnums=0)
  slots = {}
  for slot, name in enumerate(names):
    _, _, spec, tensors = tasks[name]
    bank = write(bank, slot, bank_lib.slot_arrays(layout, spec, tensors, name))
    slots[name] = slot
  return layout, bank, slots, write


def run_bank(encoder, layout, bank, features, mask, task_ids, depth=0, select='gather'):
  @jax.jit
  def run(bank, features, mask, task_ids, depth):
    x, m = bank_lib.prefix(encoder, features, mask, depth)
    return bank_lib.suffix(encoder, layout, bank, x, m, task_ids, depth, select=select), m
  return run(bank, features, mask, jnp.asarray(task_ids, jnp.int32), jnp.int32(depth))


@pytest.mark.parametrize('select', bank_lib.SELECTS)
def test_a_mixed_batch_equals_each_single_task_model(tasks, select, mesh1):
  names = list(TASKS)
  layout, bank, slots, _ = filled_bank(tasks, names)
  # Groups: TPA (relu, norm), TPA without norm, the two serial placements (gelu / relu), LoRA.
  assert len(layout.groups) == 4 and layout.lora_rank == 2
  assert layout.vocab_size == 12 and layout.num_classes == 5
  config = tasks['tpa'][0]
  batch = ctc_batch(config, seed=1, batch_size=8, num_frames=48)
  features, mask = batch['features'], batch['feature_mask']
  mask = mask.copy()
  mask[5, 30:] = False  # a shorter utterance
  row_tasks = ['serial', 'tpa', 'lora', 'head_only', 'ff_serial', 'tpa_small', 'lora', 'tpa']
  encoder = tasks['head_only'][1].encoder
  out, out_mask = run_bank(encoder, layout, bank, features, mask,
                           [slots[n] for n in row_tasks], select=select)
  for row, name in enumerate(row_tasks):
    config, model, spec, _ = tasks[name]
    logits, ref_mask = model(features, mask)
    np.testing.assert_array_equal(out_mask[row], ref_mask[row])
    if spec.head_kind == 'ctc':
      got = out['ctc'][row, :, :spec.head_size]
      assert (np.asarray(out['ctc'][row, :, spec.head_size:]) == bank_lib.PAD_LOGIT).all()
    else:
      got = out['classification'][row, :spec.head_size]
    np.testing.assert_allclose(got, logits[row], atol=1e-5, rtol=0, err_msg=name)
  # The adapters matter: the same head over the base without them gives something else.
  tpa_rows = [i for i, n in enumerate(row_tasks) if n == 'tpa']
  base_cfg = tiny_config('head', **{'head.vocab_size': 12})
  base = build.create_model(base_cfg, mesh1, seed=0)
  nnx.update(base, nnx.state(tasks['tpa'][1], HeadParam))
  plain = base(features, mask)[0]
  assert np.abs(np.asarray(out['ctc'][tpa_rows[0], :, :12]) - np.asarray(
      plain[tpa_rows[0]])).max() > 1e-2


def test_the_shared_prefix_gives_what_a_full_pass_gives(tasks):
  names = ['serial', 'lora', 'tpa_small']  # lowest adapted blocks 2, 1, 3
  layout, bank, slots, _ = filled_bank(tasks, names, capacity=4)
  config = tasks['serial'][0]
  batch = ctc_batch(config, seed=2, batch_size=3, num_frames=40)
  encoder = tasks['head_only'][1].encoder
  ids = [slots[n] for n in names]
  full, _ = run_bank(encoder, layout, bank, batch['features'], batch['feature_mask'], ids, 0)
  shared, _ = run_bank(encoder, layout, bank, batch['features'], batch['feature_mask'], ids, 1)
  for key in full:
    np.testing.assert_allclose(shared[key], full[key], atol=1e-5, rtol=0)
  # Deeper than a task's lowest adapted block, its adapters below would be skipped: the depth
  # is the caller's to keep at or below the lowest block of the rows' tasks.
  deeper, _ = run_bank(encoder, layout, bank, batch['features'], batch['feature_mask'], ids, 3)
  assert np.abs(np.asarray(deeper['ctc'][1]) - np.asarray(full['ctc'][1])).max() > 1e-3


def test_slots_are_written_without_recompiling_and_freed_slots_are_empty(tasks):
  names = ['tpa', 'lora', 'serial']
  layout, bank, slots, write = filled_bank(tasks, names, capacity=4)
  compiled = write._cache_size()  # pylint: disable=protected-access
  _, _, spec, tensors = tasks['tpa']
  bank = write(bank, 3, bank_lib.slot_arrays(layout, spec, tensors, 'tpa'))  # another slot
  bank = write(bank, slots['lora'], bank_lib.free_slot(layout))  # a task removed
  assert write._cache_size() == compiled  # pylint: disable=protected-access
  same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b))
  assert same(bank_lib.read_slot(bank, 3), bank_lib.read_slot(bank, slots['tpa']))
  assert same(bank_lib.read_slot(bank, slots['lora']),
              bank_lib.read_slot(bank_lib.empty(layout), slots['lora']))
  assert not same(bank_lib.read_slot(bank, slots['serial']),
                  bank_lib.read_slot(bank_lib.empty(layout), slots['serial']))


def test_tasks_that_do_not_fit_are_refused_naming_the_layout(tasks):
  layout = bank_lib.layout_for([tasks['tpa'][2]], tasks['tpa'][0].model, capacity=2)
  with pytest.raises(SpecMismatchError, match=r"task 'serial' does not fit the bank "
                     r"\(capacity 2; ff_parallel/relu/norm r<=8.*no group for "
                     r"block_sequential/gelu/norm.*head has 3 outputs"):
    bank_lib.slot_arrays(layout, tasks['serial'][2], tasks['serial'][3], 'serial')
  with pytest.raises(SpecMismatchError, match=r"no LoRA group"):
    bank_lib.slot_arrays(layout, tasks['lora'][2], tasks['lora'][3], 'lora')
  big = spec_lib.AdapterSpec(**{**tasks['tpa'][2].__dict__, 'bottleneck': 16})
  with pytest.raises(SpecMismatchError, match=r"bottleneck 16 exceeds the group's 8"):
    layout.check(big, 'big')
  full = spec_lib.AdapterSpec(**{**tasks['tpa'][2].__dict__, 'trainable': 'full'})
  with pytest.raises(SpecMismatchError, match=r"trained 'full' weights"):
    layout.check(full, 'full')
