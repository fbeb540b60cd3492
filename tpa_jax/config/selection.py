"""Parsing of the config values that select parts of a model: the adapted blocks
(`adapter.blocks`) and LoRA's projections (`adapter.lora_targets`). Pure Python, so a config
checks them without jax, and the model, the spec and the presets read them alike."""

from __future__ import annotations

import re
from typing import Sequence

from tpa_jax.errors import ConfigError

# target -> (module path inside a ConformerBlock, projection names) it adapts.
TARGETS: dict[str, tuple[str, str]] = {
    'q': ('attention', 'query'), 'k': ('attention', 'key'), 'v': ('attention', 'value'),
    'out': ('attention', 'out'),
    'ffn1_up': ('ffn1', 'up'), 'ffn1_down': ('ffn1', 'down'),
    'ffn2_up': ('ffn2', 'up'), 'ffn2_down': ('ffn2', 'down'),
}
# Shorthands of `adapter.lora_targets`: 'ffn1' is both of its projections.
GROUPS = {'attention': ('q', 'k', 'v', 'out'), 'ffn1': ('ffn1_up', 'ffn1_down'),
          'ffn2': ('ffn2_up', 'ffn2_down')}
DEFAULT_TARGETS = 'q,k,v,out,ffn1,ffn2'


def parse_blocks(blocks: str | int | Sequence[int], num_blocks: int) -> tuple[int, ...]:
  """Resolves a block selection to sorted block indices.

  Accepts 'all', a Python slice string ('12:24', ':8', '-4:', '0:24:2'), indices as a string
  ('5', '0,3,5', '[0, 3]') or a list of ints (negative ones count from the top). Anything outside [0, num_blocks) is an error.
  """
  accepted = (f"accepted: 'all', a slice such as '{num_blocks // 2}:{num_blocks}', or a list of "
              f'indices in [0, {num_blocks})')
  if isinstance(blocks, str):
    text = blocks.strip()
    if text == 'all':
      return tuple(range(num_blocks))
    if re.fullmatch(r'\[?\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*\]?', text):
      blocks = [int(p) for p in text.strip('[]').split(',') if p.strip()]
    elif re.fullmatch(r'(-?\d*):(-?\d*)(:(-?\d+))?', text):
      parts = [int(p) if p else None for p in text.split(':')]
      start, stop = parts[0], parts[1]
      step = parts[2] if len(parts) > 2 else None
      for bound in (start, stop):
        if bound is not None and not -num_blocks <= bound <= num_blocks:
          raise ConfigError(f'adapter.blocks={blocks!r} lies outside a model of {num_blocks} '
                           f'blocks; {accepted}')
      if step is not None and step <= 0:
        raise ConfigError(f'adapter.blocks={blocks!r}: the slice step must be positive')
      indices = tuple(range(num_blocks))[slice(start, stop, step)]
      if not indices:
        raise ConfigError(f'adapter.blocks={blocks!r} selects no block of {num_blocks}; {accepted}')
      return indices
    else:
      raise ConfigError(f'adapter.blocks={blocks!r} is not a block selection; {accepted}')
  if isinstance(blocks, int):
    blocks = [blocks]
  indices = []
  for b in blocks:
    if isinstance(b, bool) or not isinstance(b, int) or not -num_blocks <= b < num_blocks:
      raise ConfigError(f'adapter.blocks={list(blocks)!r}: {b!r} is not a block of a model with '
                       f'{num_blocks} blocks; {accepted}')
    indices.append(b % num_blocks)
  if not indices:
    raise ConfigError(f'adapter.blocks=[] selects no block; {accepted}')
  if len(set(indices)) != len(indices):
    raise ConfigError(f'adapter.blocks={list(blocks)!r} names a block twice')
  return tuple(sorted(indices))


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """'q,k,v,out,ffn1,ffn2' -> the projections it names, in TARGETS order."""
  names = [t.strip() for t in (targets.split(',') if isinstance(targets, str) else targets)]
  names = [t for t in names if t]
  chosen = set()
  for name in names:
    if name in GROUPS:
      chosen.update(GROUPS[name])
    elif name in TARGETS:
      chosen.add(name)
    else:
      raise ConfigError(f'adapter.lora_targets names {name!r}: accepted names are '
                       f'{tuple(TARGETS) + tuple(GROUPS)}')
  if not chosen:
    raise ConfigError(f'adapter.lora_targets={targets!r} names no projection; accepted names '
                     f'are {tuple(TARGETS) + tuple(GROUPS)}')
  return tuple(t for t in TARGETS if t in chosen)
