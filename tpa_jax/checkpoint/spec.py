"""The adapter spec: everything that decides whether trained adapters fit a model.

An adapter export and a run checkpoint record it: the placement, the resolved block indices
(so '2:4' and '2,3' are the same), bottleneck, residual weight, activation, norm, init, what
trained, the head's kind and size, and the base's fingerprint. Attaching, resuming and
evaluating compare it field by field, before any array is read, and refuse every difference
in one error that names each field with both values and the override that matches the saved
adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from tpa_jax.config import selection
from tpa_jax.errors import SpecMismatchError


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Adapter and head fields of a trained run plus the fingerprint of its base. Adapter fields
  are None when the model has no adapters (placement 'none')."""
  placement: str
  blocks: tuple[int, ...] | None
  bottleneck: int | None
  residual_weight: float | None
  activation: str | None
  use_norm: bool | None
  up_init: str | None
  trainable: str
  head_kind: str
  head_size: int
  base_fingerprint: str
  # LoRA (placement 'lora'; None otherwise). Records older than LoRA lack them: None.
  lora_alpha: float | None = None
  lora_targets: tuple[str, ...] | None = None

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for key in ('blocks', 'lora_targets'):
      if out[key] is not None:
        out[key] = list(out[key])
    return out

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> 'AdapterSpec':
    fields = {f.name for f in dataclasses.fields(cls)}
    optional = {f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    missing = sorted(fields - optional - set(value))
    if missing:
      raise ValueError(f'an adapter spec lacks {missing}')
    value = {k: value[k] for k in fields if k in value}
    if value['blocks'] is not None:
      value['blocks'] = tuple(int(b) for b in value['blocks'])
    if value.get('lora_targets') is not None:
      value['lora_targets'] = tuple(value['lora_targets'])
    return cls(**value)


# spec field -> the config field it comes from (for messages: what to change).
CONFIG_FIELDS = {
    'placement': 'adapter.placement', 'blocks': 'adapter.blocks',
    'bottleneck': 'adapter.bottleneck', 'residual_weight': 'adapter.residual_weight',
    'activation': 'adapter.activation', 'use_norm': 'adapter.use_norm',
    'up_init': 'adapter.up_init', 'trainable': 'train.trainable', 'head_kind': 'head.kind',
    'head_size': 'head.vocab_size', 'base_fingerprint': 'base.path',
    'lora_alpha': 'adapter.lora_alpha', 'lora_targets': 'adapter.lora_targets',
}


def from_config(config: ml_collections.ConfigDict, base_fingerprint: str) -> AdapterSpec:
  """The spec of the model `config` describes, over the base with fingerprint id
  `base_fingerprint`."""
  # Imported here: configs are read without jax (the block parser lives with the modules).
  a, h = config.adapter, config.head
  head_size = (h.vocab_size if h.kind == 'ctc' else
               config.ssl.codebook_size * config.ssl.num_codebooks if h.kind == 'best_rq' else
               h.num_classes)
  if a.placement == 'none':
    adapter = dict(blocks=None, bottleneck=None, residual_weight=None, activation=None,
                   use_norm=None, up_init=None)
  elif a.placement == 'lora':
    adapter = dict(blocks=selection.parse_blocks(a.blocks, config.model.num_blocks),
                   bottleneck=int(a.bottleneck), residual_weight=None, activation=None,
                   use_norm=None, up_init=None, lora_alpha=float(a.lora_alpha),
                   lora_targets=selection.parse_targets(a.lora_targets))
  else:
    adapter = dict(blocks=selection.parse_blocks(a.blocks, config.model.num_blocks),
                   bottleneck=int(a.bottleneck), residual_weight=float(a.residual_weight),
                   activation=str(a.activation), use_norm=bool(a.use_norm),
                   up_init=str(a.up_init))
  return AdapterSpec(placement=str(a.placement), trainable=str(config.train.trainable),
                     head_kind=str(h.kind), head_size=int(head_size),
                     base_fingerprint=str(base_fingerprint), **adapter)


def _override(field: str, saved: AdapterSpec) -> str:
  """The command-line override that makes a config match `saved` in `field`."""
  value = getattr(saved, field)
  if field == 'base_fingerprint':
    return f'--config.base.path=<the base with fingerprint {value}>'
  if field == 'head_size' and saved.head_kind == 'classification':
    return f'--config.head.num_classes={value}'
  if field in ('blocks', 'lora_targets'):
    return f"--config.{CONFIG_FIELDS[field]}={','.join(str(b) for b in value)}"
  return f'--config.{CONFIG_FIELDS[field]}={value}'


def differences(saved: AdapterSpec, current: AdapterSpec, *,
                saved_as: str = 'checkpoint') -> list[str]:
  """One line per differing field: the config field, the saved value (in the `saved_as`) and
  this config's, and the override that matches the saved adapters."""
  lines = []
  for f in dataclasses.fields(AdapterSpec):
    a, b = getattr(saved, f.name), getattr(current, f.name)
    if a == b:
      continue
    if f.name == 'base_fingerprint':
      lines.append(f"the adapters were trained on base {a}, but this run's base is {b} (to "
                   f'match: {_override(f.name, saved)})')
    else:
      lines.append(f'{CONFIG_FIELDS[f.name]}: {saved_as} {a!r}, config {b!r} (to match: '
                   f'{_override(f.name, saved)})')
  return lines


def check(saved: AdapterSpec, current: AdapterSpec, *, what: str,
          saved_as: str = 'checkpoint') -> None:
  """Raises SpecMismatchError listing every field in which `saved` (the spec recorded with
  `what`, a `saved_as`) differs from `current` (this config's)."""
  lines = differences(saved, current, saved_as=saved_as)
  if lines:
    raise SpecMismatchError(
        f'{what} does not fit this config: ' + '; '.join(lines) + '. Use the config the '
        'adapters were trained with (the overrides above), or train new adapters. Nothing was '
        'read, moved or deleted.')
