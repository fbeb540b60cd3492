"""An adapter bank: many tasks' adapters and heads over one frozen encoder, routed per example.

A bank holds up to `capacity` tasks. Each example of a batch carries a task index (its slot);
every block applies that example's own adapters, and each example gets its own task's head.

How tasks of different kinds share one bank, exactly:
- residual adapters are grouped by (placement, activation, norm): each group stacks its weights
  on [block, slot, ...] with the largest bottleneck of the group; a task's smaller bottleneck is
  zero-padded (zero down columns and up rows add exactly 0) and its unselected blocks are zero
  adapters (exactly 0 added);
- every block applies every group to every example, the parallel groups of a slot before its
  sequential ones: an example's zero adapters leave its stream bit-identical, so it sees only
  its own task's adapters in its own task's order;
- LoRA tasks share one LoRA group (rank padded with zeros; every target the bank reserves);
- CTC heads are padded to the largest vocabulary (padded logits are -1e9, so a softmax or an
  argmax over them equals one over the task's own), classification heads to the most classes.
Which groups exist and their sizes are the bank's `Layout`, fixed when its programs compile;
adding or removing a task writes one slot of fixed-shape arrays, so nothing recompiles. A task
that needs a group, bottleneck, target or head size the layout lacks is refused, naming what
the layout holds.

The weights of one example are gathered per example (`select='gather'`) or picked by a one-hot
product (`select='onehot'`); `benchmarks/serving.py` measures both.

Frozen work is shared: `prefix` runs the frontend and blocks [0, depth) once per utterance, and
`suffix` runs blocks [depth, N) and the heads once per (utterance, task) row. `depth` is a
traced scalar (each block runs under a `lax.cond`), so one program serves every depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpa_jax.checkpoint.spec import AdapterSpec
from tpa_jax.errors import SpecMismatchError
from tpa_jax.serve import serving_loader as loader
from tpa_jax.nn import adapters as adapters_lib
from tpa_jax.nn import lora as lora_lib
from tpa_jax.nn.conformer import ConformerEncoder

SELECTS = ('gather', 'onehot')
PAD_LOGIT = loader.PAD_LOGIT


@dataclasses.dataclass(frozen=True)
class Group:
  """Residual adapters of one placement, activation and norm, padded to `bottleneck`."""
  placement: str
  activation: str
  use_norm: bool
  bottleneck: int

  @property
  def key(self) -> str:
    return loader.group_key(self.placement, self.activation, self.use_norm)

  @property
  def sequential(self) -> bool:
    return self.placement in adapters_lib.SEQUENTIAL


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a bank can hold; fixed when its programs compile."""
  capacity: int
  num_blocks: int
  dim: int
  num_heads: int
  ffn_dim: int
  eps: float
  groups: tuple[Group, ...] = ()
  lora_rank: int = 0  # 0: no LoRA group
  lora_targets: tuple[str, ...] = ()
  vocab_size: int = 0  # CTC heads are padded to it (0: no CTC task)
  num_classes: int = 0  # classification heads (0: no classification task)

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'lora_targets': list(self.lora_targets),
            'groups': [dataclasses.asdict(g) for g in self.groups]}

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> 'Layout':
    return cls(**{**value, 'groups': tuple(Group(**g) for g in value['groups']),
                  'lora_targets': tuple(value['lora_targets'])})

  def group_of(self, spec: AdapterSpec) -> Group | None:
    for g in self.groups:
      if (g.placement, g.activation, g.use_norm) == (spec.placement, spec.activation,
                                                     spec.use_norm):
        return g
    return None

  def describe(self) -> str:
    parts = [f'{g.key} r<={g.bottleneck}' for g in self.groups]
    if self.lora_rank:
      parts.append(f'lora rank<={self.lora_rank} on {",".join(self.lora_targets)}')
    parts.append(f'ctc vocabulary<={self.vocab_size}, classes<={self.num_classes}')
    return f'capacity {self.capacity}; ' + '; '.join(parts)

  def check(self, spec: AdapterSpec, name: str) -> None:
    """Refuses a task this layout cannot hold exactly, naming what it holds."""
    problems = []
    if spec.trainable not in ('adapters', 'head'):
      problems.append(f'it trained {spec.trainable!r} weights; a bank serves adapter and '
                      'head-only tasks over a frozen base')
    if spec.placement == 'lora':
      if not self.lora_rank:
        problems.append('it is a LoRA task and the bank has no LoRA group')
      else:
        if spec.bottleneck > self.lora_rank:
          problems.append(f'its LoRA rank {spec.bottleneck} exceeds the bank\'s '
                          f'{self.lora_rank}')
        missing = sorted(set(spec.lora_targets) - set(self.lora_targets))
        if missing:
          problems.append(f'its LoRA targets {missing} are not in the bank\'s')
    elif spec.placement != 'none':
      group = self.group_of(spec)
      if group is None:
        problems.append(f'the bank has no group for {spec.placement}/{spec.activation}/'
                        f'{"norm" if spec.use_norm else "no_norm"} adapters')
      elif spec.bottleneck > group.bottleneck:
        problems.append(f'its bottleneck {spec.bottleneck} exceeds the group\'s '
                        f'{group.bottleneck}')
    if spec.blocks is not None and any(b >= self.num_blocks for b in spec.blocks):
      problems.append(f'its blocks {list(spec.blocks)} lie outside a base of {self.num_blocks}')
    size = self.vocab_size if spec.head_kind == 'ctc' else self.num_classes
    if spec.head_size > size:
      problems.append(f'its {spec.head_kind} head has {spec.head_size} outputs, the bank\'s '
                      f'at most {size}')
    if problems:
      raise SpecMismatchError(f'task {name!r} does not fit the bank ({self.describe()}): ' +
                              '; '.join(problems) + '. Start the server with a layout that '
                              'reserves it (--capacity, --reserve).')


def layout_for(specs: Iterable[AdapterSpec], model_config, *, capacity: int,
               reserve: Sequence[AdapterSpec] = ()) -> Layout:
  """The smallest layout holding every task of `specs` and `reserve` (specs of tasks that may
  be added later) over the base `model_config` describes."""
  groups: dict[tuple, int] = {}
  lora_rank, lora_targets, vocab, classes = 0, set(), 0, 0
  for spec in [*specs, *reserve]:
    if spec.placement == 'lora':
      lora_rank = max(lora_rank, spec.bottleneck)
      lora_targets.update(spec.lora_targets)
    elif spec.placement != 'none':
      key = (spec.placement, spec.activation, spec.use_norm)
      groups[key] = max(groups.get(key, 0), spec.bottleneck)
    if spec.head_kind == 'ctc':
      vocab = max(vocab, spec.head_size)
    else:
      classes = max(classes, spec.head_size)
  m = model_config
  return Layout(
      capacity=capacity, num_blocks=m.num_blocks, dim=m.dim, num_heads=m.num_heads,
      ffn_dim=m.ffn_dim, eps=m.norm_eps,
      groups=tuple(Group(p, a, n, r) for (p, a, n), r in sorted(groups.items())),
      lora_rank=lora_rank,
      lora_targets=tuple(t for t in lora_lib.TARGETS if t in lora_targets),
      vocab_size=vocab, num_classes=classes)


# -- the bank's arrays (numpy, in serving_loader.py: the standalone loader builds slots too) ------
def shapes(layout: Layout) -> dict[str, Any]:
  """The bank's arrays as a tree of (shape, logical axes), every one with a slot axis.
  Per-block arrays are [block, slot, ...]."""
  return loader.bank_shapes(layout.to_json())


def empty(layout: Layout, sharding_of=None) -> dict[str, Any]:
  """A bank with every slot free: zero adapters, heads whose every logit is PAD_LOGIT.
  `sharding_of(axes)`: where each array is placed (default: the default device)."""
  def make(leaf, path):
    shape, axes = leaf
    value = jnp.full(shape, loader.fill_value(path), jnp.float32)
    return jax.device_put(value, sharding_of(axes)) if sharding_of else value
  return loader.map_with_path(make, shapes(layout))


def slot_arrays(layout: Layout, spec: AdapterSpec, tensors: dict[str, np.ndarray],
                name: str) -> dict[str, Any]:
  """One task's arrays in the bank's layout without the slot axis ([block, ...] per block):
  its adapters at its blocks, zeros elsewhere and in the padding; its head padded with
  PAD_LOGIT biases. `tensors` are an adapter export's (names as `nnx` state paths). Refuses a
  task the layout cannot hold."""
  layout.check(spec, name)
  try:
    return loader.slot_arrays(layout.to_json(), spec.to_json(), tensors)
  except KeyError as e:
    raise SpecMismatchError(f'task {name!r}: its export lacks {e.args[0]}; re-export it with '
                            'launch/export.py --kind=adapter') from e


def free_slot(layout: Layout) -> dict[str, Any]:
  """The arrays of a free slot (`write_slot` them to remove a task): zero adapters, PAD_LOGIT
  head biases."""
  return loader.free_slot(layout.to_json())


def write_slot(bank: dict[str, Any], slot, arrays: dict[str, Any]) -> dict[str, Any]:
  """`bank` with slot `slot` (a traced index: one program for every slot) set to `arrays`
  (`slot_arrays` or `free_slot`). Jit it with the bank donated."""
  def put(dst, src, path):
    return dst.at[(slice(None),) * loader.slot_axis(path) + (slot,)].set(src)
  return _map2(put, bank, arrays)


def read_slot(bank: dict[str, Any], slot: int) -> dict[str, Any]:
  """The arrays of slot `slot` of `bank` (as `slot_arrays` wrote them)."""
  return _map2(lambda a, _, path: jnp.take(a, slot, axis=loader.slot_axis(path)), bank, bank)


def _map2(fn, a, b, path=()):
  if not isinstance(a, dict):
    return fn(a, b, path)
  return {k: _map2(fn, a[k], b[k], path + (k,)) for k in a}


# -- applying it ----------------------------------------------------------------------------------
def _selector(task_ids: jax.Array, capacity: int, how: str):
  """w[slot, ...] -> each row's w[task_ids[row], ...]."""
  if how == 'gather':
    return lambda w: jnp.take(w, task_ids, axis=0)
  if how == 'onehot':
    onehot = jax.nn.one_hot(task_ids, capacity, dtype=jnp.float32)
    return lambda w: jnp.einsum('rk,k...->r...', onehot, w,
                                precision=jax.lax.Precision.HIGHEST)
  raise ValueError(f'select={how!r}: accepted values are {SELECTS}')


def _norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype) -> jax.Array:
  """LayerNorm with per-row scale and bias [R, D] (tpa_jax.nn.layers.LayerNorm's arithmetic)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale[:, None, :] + bias[:, None, :]
  return y.astype(dtype)


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype, out_dtype=None):
  """x [R, T, I] times per-row kernels [R, I, O] (+ bias [R, O]): tpa_jax.nn.layers.Dense's
  arithmetic, one kernel per row."""
  out_dtype = out_dtype or dtype
  y = jnp.einsum('rti,rio->rto', x.astype(dtype), kernel.astype(dtype),
                 preferred_element_type=out_dtype)
  return y if bias is None else y + bias.astype(out_dtype)[:, None, :]


class _Rows:
  """The bank's adapters of one block for the rows of a batch: what ConformerBlock calls."""

  def __init__(self, layout: Layout, layer: dict, per_task: dict, select, dtype):
    self.layout, self.layer, self.per_task, self.select, self.dtype = (
        layout, layer, per_task, select, dtype)

  def _adapter(self, group: Group, p: dict, x: jax.Array) -> jax.Array:
    s = self.select
    h = _norm(x, s(p['scale']), s(p['bias']), self.layout.eps, self.dtype) if group.use_norm else x
    h = _dense(h, s(p['down']), s(p['down_bias']), self.dtype)
    h = adapters_lib.ACTIVATIONS[group.activation](h)
    return _dense(h, s(p['up']), s(p['up_bias']), self.dtype)

  def adapt(self, slot: str, x: jax.Array, y: jax.Array) -> jax.Array:
    groups = [g for g in self.layout.groups if slot in adapters_lib.PLACEMENTS[g.placement]]
    for group in sorted(groups, key=lambda g: g.sequential):  # parallel ones first
      # In the compute dtype, as the single-task path's Python-float residual weight.
      weight = self.select(self.per_task['groups'][group.key])[:, None, None].astype(y.dtype)
      y = y + weight * self._adapter(group, self.layer['groups'][group.key][slot],
                                     y if group.sequential else x)
    return y

  def update(self, target: str, x: jax.Array) -> jax.Array | None:
    if target not in self.layout.lora_targets:
      return None
    p = self.layer['lora'][target]
    lead = x.shape[:2]
    x_flat = x.reshape(*lead, -1)
    h = _dense(x_flat, self.select(p['a']), None, self.dtype)
    y = _dense(h, self.select(p['b']), None, self.dtype)
    out_shape = lora_lib.target_shapes(self.layout.dim, self.layout.num_heads,
                                       self.layout.ffn_dim)[target][1]
    scale = self.select(self.per_task['lora_scale'])[:, None, None]
    return (scale * y).reshape(*lead, *out_shape)


def _split(bank: dict) -> tuple[dict, dict]:
  """(per-block arrays [block, slot, ...], per-task arrays [slot, ...]) of a bank."""
  layers = {'groups': {g: {s: v for s, v in slots.items() if s != 'weight'}
                       for g, slots in bank['groups'].items()}}
  per_task = {'groups': {g: slots['weight'] for g, slots in bank['groups'].items()}}
  if 'lora' in bank:
    layers['lora'] = bank['lora']
    per_task['lora_scale'] = bank['lora_scale']
  return layers, per_task


def _run(encoder: ConformerEncoder, x: jax.Array, mask: jax.Array, lo, hi,
         layers: dict | None = None, rows=None) -> jax.Array:
  """Blocks [lo, hi) of `encoder` (traced bounds: each block runs under a lax.cond), each with
  the adapters `rows(layers of that block)` (none without `layers`)."""
  block_def, block_state = nnx.split(encoder.blocks)

  def body(x, layer):
    i, weights, bank_layer = layer

    def apply(x):
      adapters = rows(bank_layer) if layers is not None else None
      return nnx.merge(block_def, weights)(x, mask, adapters)
    return jax.lax.cond((i >= lo) & (i < hi), apply, lambda x: x, x), None

  x, _ = jax.lax.scan(body, x, (jnp.arange(encoder.num_blocks), block_state, layers))
  return x


def prefix(encoder: ConformerEncoder, features: jax.Array, mask: jax.Array,
           depth) -> tuple[jax.Array, jax.Array]:
  """The frozen work shared by every task of an utterance: frontend and blocks [0, depth)."""
  x, out_mask = encoder.frontend(features, mask)
  return _run(encoder, x, out_mask, 0, depth), out_mask


def suffix(encoder: ConformerEncoder, layout: Layout, bank: dict, x: jax.Array,
           mask: jax.Array, task_ids: jax.Array, depth, *, select: str = 'gather',
           dtype=jnp.float32) -> dict[str, jax.Array]:
  """Blocks [depth, N) with each row's adapters, then each row's head: {'ctc': [R, T, V],
  'classification': [R, C]} (the heads the layout has; a row of the other kind is garbage)."""
  layers, per_task = _split(bank)
  select_fn = _selector(task_ids, layout.capacity, select)

  rows = lambda layer: _Rows(layout, layer, per_task, select_fn, dtype)
  x = encoder.finish(_run(encoder, x, mask, depth, layout.num_blocks, layers, rows))
  out = {}
  if 'ctc' in bank:
    out['ctc'] = _dense(x, select_fn(bank['ctc']['kernel']), select_fn(bank['ctc']['bias']),
                        dtype, jnp.float32)
  if 'classification' in bank:
    w = mask.astype(jnp.float32)
    pooled = jnp.einsum('btd,bt->bd', x.astype(jnp.float32), w)
    pooled = pooled / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    out['classification'] = _dense(
        pooled[:, None, :], select_fn(bank['classification']['kernel']),
        select_fn(bank['classification']['bias']), dtype, jnp.float32)[:, 0]
  return out
