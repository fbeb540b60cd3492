"""Loads and runs tpa_jax serving bundles with jax, numpy and safetensors only.

Two kinds of bundle, written by `launch/export.py --kind=serving`:
- a run's bundle (`--workdir=RUN`): `function.jaxexport` (features -> logits, serialised with
  `jax.export`), `weights.safetensors` (base, adapters and head) and `manifest.json`;
- a multi-task bundle (`--config=... --adapters=NAME=FILE,...`): the base once
  (`base.safetensors`) and a function that also takes an adapter bank, each row's task slot
  and utterance, and the depth of the shared frozen prefix. A task is added from its adapter
  export alone (`MultiTaskBundle.add`); a batch mixes tasks.

This file imports nothing from tpa_jax, so it can be copied on its own next to a server:

  python serving_loader.py BUNDLE FEATURES.npy [MASK.npy] OUT.npy      # a run's bundle

FEATURES is float32 [batch, frames, mel bins]; MASK is bool [batch, frames] (all true if
omitted); OUT receives float32 logits [batch, output frames, vocabulary] (or [batch, classes]).

The numpy half of tpa_jax's adapter bank lives here too (the bank's array shapes, free slots,
a task's slot arrays from its export), so the server and this loader build slots one way.
"""

import json
import os
import sys

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


class Bundle:
  """A loaded serving bundle: `bundle(features, mask) -> (logits, output mask)`."""

  def __init__(self, path: str):
    with open(os.path.join(path, 'manifest.json')) as f:
      self.manifest = json.load(f)
    with open(os.path.join(path, 'function.jaxexport'), 'rb') as f:
      self.function = jax.export.deserialize(bytearray(f.read()))
    self.weights = {k: jax.numpy.asarray(v)
                    for k, v in load_file(os.path.join(path, 'weights.safetensors')).items()}

  def __call__(self, features, mask=None):
    features = np.asarray(features, np.float32)
    if mask is None:
      mask = np.ones(features.shape[:2], bool)
    return self.function.call(self.weights, features, np.asarray(mask, bool))


# -- adapter banks (numpy) --------------------------------------------------------------------
# Logit of a padded vocabulary entry or class: far below any real logit, finite.
PAD_LOGIT = -1e9
# placement -> the adapter slots of a block (tpa_jax.nn.adapters.PLACEMENTS; a test keeps them
# equal).
PLACEMENT_SLOTS = {
    'ff_parallel': ('ffn1', 'ffn2'), 'ff_sequential': ('ffn1', 'ffn2'),
    'block_parallel': ('block',), 'block_sequential': ('block',),
    'mhsa_parallel': ('mhsa',), 'conv_parallel': ('conv',),
}


def group_key(placement: str, activation: str, use_norm: bool) -> str:
  return f'{placement}/{activation}/{"norm" if use_norm else "no_norm"}'


def lora_sizes(layout: dict) -> dict:
  """LoRA target -> (flattened input size, flattened output size) of its projection."""
  d, f = layout['dim'], layout['ffn_dim']
  sizes = {'q': (d, d), 'k': (d, d), 'v': (d, d), 'out': (d, d),
           'ffn1_up': (d, f), 'ffn1_down': (f, d), 'ffn2_up': (d, f), 'ffn2_down': (f, d)}
  return {t: sizes[t] for t in layout['lora_targets']}


def bank_shapes(layout: dict) -> dict:
  """The bank's arrays as a tree of (shape, logical axes), each with a slot axis; per-block
  arrays are [block, slot, ...]. `layout` is a bank layout's JSON (a bundle's manifest has it)."""
  n, k, d = layout['num_blocks'], layout['capacity'], layout['dim']
  tree = {'groups': {}}
  for g in layout['groups']:
    r = g['bottleneck']
    slot = {'down': ((n, k, d, r), ('layers', None, 'embed', 'adapter')),
            'down_bias': ((n, k, r), ('layers', None, 'adapter')),
            'up': ((n, k, r, d), ('layers', None, 'adapter', 'embed')),
            'up_bias': ((n, k, d), ('layers', None, 'embed'))}
    if g['use_norm']:
      slot.update(scale=((n, k, d), ('layers', None, 'embed')),
                  bias=((n, k, d), ('layers', None, 'embed')))
    key = group_key(g['placement'], g['activation'], g['use_norm'])
    tree['groups'][key] = {s: dict(slot) for s in PLACEMENT_SLOTS[g['placement']]}
    tree['groups'][key]['weight'] = ((k,), (None,))
  if layout['lora_rank']:
    r = layout['lora_rank']
    tree['lora'] = {t: {'a': ((n, k, i, r), ('layers', None, None, 'adapter')),
                        'b': ((n, k, r, o), ('layers', None, 'adapter', None))}
                    for t, (i, o) in lora_sizes(layout).items()}
    tree['lora_scale'] = ((k,), (None,))
  for head, size in (('ctc', layout['vocab_size']), ('classification', layout['num_classes'])):
    if size:
      tree[head] = {'kernel': ((k, d, size), (None, 'embed', 'vocab')),
                    'bias': ((k, size), (None, 'vocab'))}
  return tree


def _is_leaf(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def map_with_path(fn, tree, path=()):
  """`fn(leaf, path)` over a tree of dicts (leaves: (shape, axes) pairs or arrays)."""
  if isinstance(tree, dict):
    return {k: map_with_path(fn, v, path + (k,)) for k, v in tree.items()}
  return fn(tree, path)


def fill_value(path: tuple) -> float:
  """A free slot's value: PAD_LOGIT for head biases (padded outputs never win), else 0."""
  return PAD_LOGIT if path[-1] == 'bias' and path[0] in ('ctc', 'classification') else 0.0


def slot_axis(path: tuple) -> int:
  """The slot axis of a bank array: 1 for per-block arrays [block, slot, ...], else 0."""
  return 1 if path[0] in ('groups', 'lora') and path[-1] != 'weight' else 0


def empty_bank(layout: dict) -> dict:
  """A bank (numpy) with every slot free."""
  return map_with_path(lambda leaf, path: np.full(leaf[0], fill_value(path), np.float32),
                       bank_shapes(layout))


def free_slot(layout: dict) -> dict:
  """The arrays of a free slot: zero adapters, PAD_LOGIT head biases."""
  def zeros(leaf, path):
    shape = list(leaf[0])
    del shape[slot_axis(path)]
    return np.full(shape, fill_value(path), np.float32)
  return map_with_path(zeros, bank_shapes(layout))


def slot_arrays(layout: dict, spec: dict, tensors: dict) -> dict:
  """One task's arrays without the slot axis: its adapters at its blocks, zeros elsewhere and
  in the padding, its head padded. `spec` is the adapter spec of its export (JSON), `tensors`
  its arrays; raises KeyError naming an array the export lacks."""
  out = free_slot(layout)
  get = lambda key: np.asarray(tensors[key], np.float32)
  blocks, r = list(spec['blocks'] or ()), spec['bottleneck']
  if spec['placement'] == 'lora':
    for target in spec['lora_targets']:
      dst = out['lora'][target]
      dst['a'][blocks, :, :r] = get(f'encoder/adapters/slots/{target}/a/kernel').reshape(
          len(blocks), -1, r)
      dst['b'][blocks, :r, :] = get(f'encoder/adapters/slots/{target}/b/kernel').reshape(
          len(blocks), r, -1)
    out['lora_scale'] = np.float32(spec['lora_alpha'] / r)
  elif spec['placement'] != 'none':
    dst = out['groups'][group_key(spec['placement'], spec['activation'], spec['use_norm'])]
    for slot in PLACEMENT_SLOTS[spec['placement']]:
      prefix = f'encoder/adapters/slots/{slot}'
      dst[slot]['down'][blocks, :, :r] = get(f'{prefix}/down/kernel')
      dst[slot]['down_bias'][blocks, :r] = get(f'{prefix}/down/bias')
      dst[slot]['up'][blocks, :r, :] = get(f'{prefix}/up/kernel')
      dst[slot]['up_bias'][blocks] = get(f'{prefix}/up/bias')
      if spec['use_norm']:
        dst[slot]['scale'][blocks] = get(f'{prefix}/norm/scale')
        dst[slot]['bias'][blocks] = get(f'{prefix}/norm/bias')
    dst['weight'] = np.float32(spec['residual_weight'])
  head = out[spec['head_kind']]
  head['kernel'][:, :spec['head_size']] = get('head/proj/kernel')
  head['bias'][:spec['head_size']] = get('head/proj/bias')
  return out


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a.b.c': array} of a tree of dicts (group keys hold '/', never '.')."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


class MultiTaskBundle:
  """A multi-task bundle: one base, a bank of `manifest['layout']['capacity']` task slots.

  `add(name, adapters_path)` loads an adapter export into a free slot; `bundle(features, mask,
  tasks)` runs utterances, each for its list of task names, in one batch, and returns for each
  utterance a list of (task, logits): CTC [output frames, vocabulary] of its valid frames, or
  classification [classes]."""

  def __init__(self, path: str):
    with open(os.path.join(path, 'manifest.json')) as f:
      self.manifest = json.load(f)
    if self.manifest.get('format') != 'tpa_jax.multitask_serving/1':
      raise ValueError(f'{path} is not a multi-task serving bundle')
    with open(os.path.join(path, 'function.jaxexport'), 'rb') as f:
      self.function = jax.export.deserialize(bytearray(f.read()))
    self.weights = load_file(os.path.join(path, 'base.safetensors'))
    self.layout = self.manifest['layout']
    self.bank = empty_bank(self.layout)
    self.tasks = {}  # name -> (slot, spec)

  def add(self, name: str, adapters_path: str) -> int:
    """Writes the task of an adapter export into a free slot; returns the slot."""
    with safe_open(adapters_path, framework='numpy') as f:
      spec = json.loads((f.metadata() or {}).get('spec', 'null') or 'null')
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    if spec is None:
      raise ValueError(f'{adapters_path} carries no adapter spec; re-export it')
    if spec['base_fingerprint'] != self.manifest['base_fingerprint']:
      raise ValueError(f'{adapters_path} was trained on base {spec["base_fingerprint"]}, this '
                       f'bundle\'s base is {self.manifest["base_fingerprint"]}')
    used = {slot for slot, _ in self.tasks.values()}
    free = [s for s in range(self.layout['capacity']) if s not in used]
    if name in self.tasks or not free:
      raise ValueError(f'cannot add {name!r}: ' + ('already added' if name in self.tasks else
                       f'the bank is full (capacity {self.layout["capacity"]})'))
    if spec['trainable'] not in ('adapters', 'head'):
      raise ValueError(f'{adapters_path} trained {spec["trainable"]!r} weights; a bank serves '
                       'adapter and head-only tasks over a frozen base')
    try:
      arrays = slot_arrays(self.layout, spec, tensors)
    except (KeyError, ValueError, IndexError) as e:
      raise ValueError(f'{adapters_path} does not fit this bundle\'s bank (layout '
                       f'{self.layout}): {type(e).__name__}: {e}') from e
    self._write(free[0], arrays)
    self.tasks[name] = (free[0], spec)
    return free[0]

  def remove(self, name: str) -> None:
    """Frees `name`'s slot (zeroed: nothing of it reaches another task)."""
    slot, _ = self.tasks.pop(name)
    self._write(slot, free_slot(self.layout))

  def _write(self, slot: int, arrays: dict) -> None:
    def put(dst, path):
      dst[(slice(None),) * slot_axis(path) + (slot,)] = _get(arrays, path)
      return dst
    map_with_path(put, self.bank)

  def __call__(self, features, mask, tasks):
    features = np.asarray(features, np.float32)
    mask = np.ones(features.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    rows = [(u, name) for u, names in enumerate(tasks) for name in names]
    unknown = sorted({n for _, n in rows if n not in self.tasks})
    if unknown:
      raise KeyError(f'unknown tasks {unknown}; added: {sorted(self.tasks)}')
    lows = [min(self.tasks[n][1]['blocks']) for _, n in rows if self.tasks[n][1]['blocks']]
    depth = np.int32(min(lows, default=self.layout['num_blocks']))
    row_utterance = np.array([u for u, _ in rows], np.int32)
    task_ids = np.array([self.tasks[n][0] for _, n in rows], np.int32)
    out, out_mask = self.function.call(self.weights, flatten(self.bank), features, mask,
                                       row_utterance, task_ids, depth)
    out_mask = np.asarray(out_mask)
    results = [[] for _ in tasks]
    for i, (u, name) in enumerate(rows):
      spec = self.tasks[name][1]
      if spec['head_kind'] == 'ctc':
        logits = np.asarray(out['ctc'][i])[out_mask[i], :spec['head_size']]
      else:
        logits = np.asarray(out['classification'][i])[:spec['head_size']]
      results[u].append((name, logits))
    return results


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def main(argv):
  if len(argv) not in (4, 5):
    raise SystemExit(__doc__)
  bundle = Bundle(argv[1])
  features = np.load(argv[2])
  mask = np.load(argv[3]) if len(argv) == 5 else None
  logits, _ = bundle(features, mask)
  np.save(argv[-1], np.asarray(logits))


if __name__ == '__main__':
  main(sys.argv)
