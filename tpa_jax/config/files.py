"""Config files and command-line overrides: `path[:arg]` loading, `key=value` arguments, and
named errors for `--config.a.b=...` fields a config lacks."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from tpa_jax.errors import ConfigError


def parse_arg(arg: str | None) -> dict[str, str]:
  """'model=tiny,method=tpa' -> {'model': 'tiny', 'method': 'tpa'}. A part without '=' continues
  the value before it, so a value may be a list: 'blocks=2,3' -> {'blocks': '2,3'}; a bare name
  without '=' ('model') is a key without a value, an error."""
  out, key = {}, None
  for part in filter(None, (arg or '').split(',')):
    if '=' in part:
      key, value = (s.strip() for s in part.split('=', 1))
      out[key] = value
    elif key is None or part.strip().isidentifier():
      raise ConfigError(f'config argument {part!r} is not key=value (in {arg!r}); accepted: '
                        'key=value[,key=value...], where a value may be a list (blocks=2,3)')
    else:
      out[key] += ',' + part.strip()
  return out


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of 'configs/x.py[:arg]', as `--config=` loads it (`get_config(arg)`)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_config_file', path)
  if module_spec is None or not os.path.isfile(path):
    raise ValueError(f'--config={spec!r}: no config file {path!r}')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def check_overrides(config: ml_collections.ConfigDict, argv: list[str],
                    flag: str = 'config') -> None:
  """Raises a ValueError naming the first `--config.a.b=...` of `argv` whose field `config`
  lacks, with the fields accepted at that level (config_flags reports only the missing key)."""
  prefix = f'--{flag}.'
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split('=', 1)[0]
    node = config
    parts = path.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join([flag, *parts[:i]])
        accepted = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f'--{flag}.{path}: {where} has no field {part!r}; accepted fields of '
                         f'{where}: {accepted}')
      node = node[part]
