"""Logical-axis sharding: one rule table from logical names to mesh axes, meshes and constraints.

Every parameter carries logical axis names in its `out_sharding` metadata and every key activation
is constrained by logical names; this module alone knows how those names land on the mesh axes
`data`, `fsdp` and `tensor`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tpa_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')

# The vocabulary of logical axes. Layers use only these names.
LOGICAL_AXES = ('batch', 'time', 'embed', 'mlp', 'heads', 'kv', 'conv', 'vocab', 'layers', 'adapter')

# Logical axis -> mesh axes. FSDP shards the model dimension of weights; tensor parallelism shards
# hidden, head and channel dimensions; the batch is split over both data-like axes. A mesh axis is
# used at most once per array: for an activation ('batch', 'time', 'embed') the batch takes `fsdp`
# and `embed` stays unsharded.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp')),
    ('time', None),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('conv', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
    ('adapter', None),
)


class _RuleContext(threading.local):
  rules = DEFAULT_RULES


_CONTEXT = _RuleContext()


def validate_rules(rules: Sequence[tuple[str, object]]) -> tuple:
  """Checks a rule table names only known logical and mesh axes; returns it as a tuple."""
  rules = tuple((str(name), target) for name, target in rules)
  for name, target in rules:
    if name not in LOGICAL_AXES:
      raise ValueError(f'sharding rule for unknown logical axis {name!r}; known: {LOGICAL_AXES}')
    targets = (target,) if isinstance(target, str) or target is None else tuple(target)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise ValueError(f'sharding rule {name!r} -> {target!r} names mesh axis {t!r}; '
                         f'mesh axes are {MESH_AXES}')
  return rules


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, object]] | None = None) -> Iterator[tuple]:
  """Makes `rules` the table used by `logical_to_spec` and `constrain` (also inside flax)."""
  rules = validate_rules(rules if rules is not None else DEFAULT_RULES)
  old = _CONTEXT.rules
  _CONTEXT.rules = rules
  try:
    with nnx.logical_axis_rules(rules):
      yield rules
  finally:
    _CONTEXT.rules = old


def current_rules() -> tuple:
  return _CONTEXT.rules


def logical_to_spec(axes: Sequence[str | None], rules: Sequence | None = None,
                    mesh_axis_names: Sequence[str] | None = None) -> P:
  """Maps logical axis names to a PartitionSpec, using each mesh axis at most once.

  Mesh axes absent from `mesh_axis_names` (when given) are dropped, so the same rules serve a mesh
  without a `tensor` axis.
  """
  table = dict(rules if rules is not None else current_rules())
  used: set[str] = set()
  spec = []
  for name in axes:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f'logical axis {name!r} has no sharding rule; known: {tuple(table)}')
    target = table[name]
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    targets = tuple(t for t in targets if t not in used
                    and (mesh_axis_names is None or t in mesh_axis_names))
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return P(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical axes; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh_axis_names=mesh.axis_names))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a (data, fsdp, tensor) mesh with Auto axes; one size may be -1 to take the rest."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = {'data': data, 'fsdp': fsdp, 'tensor': tensor}
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ConfigError(f'mesh.{name}={size!r}: expected a positive integer or -1 (the rest)')
  auto = [k for k, v in sizes.items() if v == -1]
  if len(auto) > 1:
    raise ConfigError(f'mesh: only one axis may be -1, got {auto}')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if auto:
    if n % fixed:
      raise ConfigError(f'mesh {sizes} does not divide {n} devices: the fixed axes multiply to '
                        f'{fixed}')
    sizes[auto[0]] = n // fixed
  if math.prod(sizes.values()) != n:
    raise ConfigError(f'mesh {sizes} needs {math.prod(sizes.values())} devices, {n} are available; '
                     'set one axis to -1 to take the rest')
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def parse_mesh(text: str, num_devices: int) -> dict[str, int]:
  """'data=2,fsdp=-1' -> {'data': 2, 'fsdp': num_devices // 2, 'tensor': 1}, checked against
  the device count (named errors, before anything is built)."""
  sizes = {'data': 1, 'fsdp': 1, 'tensor': 1}
  for part in filter(None, text.split(',')):
    name, _, value = part.partition('=')
    name = name.strip()
    if name not in sizes:
      raise ConfigError(f'mesh axis {name!r} in --mesh={text!r}: accepted axes are '
                       f'{MESH_AXES}')
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ConfigError(f'mesh axis {name}={value!r} in --mesh={text!r}: accepted sizes are '
                       'positive integers or -1 (the remaining devices)') from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise ConfigError(f'mesh axis {name}={value} in --mesh={text!r}: accepted sizes are '
                       'positive integers or -1 (the remaining devices)')
  auto = [k for k, v in sizes.items() if v == -1]
  if len(auto) > 1:
    raise ConfigError(f'--mesh={text!r}: only one axis may be -1, got {auto}')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  if (auto and num_devices % fixed) or (not auto and fixed != num_devices):
    raise ConfigError(f'--mesh={text!r} does not divide {num_devices} devices: its fixed axes '
                     f'multiply to {fixed}; accepted: sizes multiplying to {num_devices}, or to '
                     f'one of {divisors} with one axis -1')
  if auto:
    sizes[auto[0]] = num_devices // fixed
  return sizes


def program_mesh(config_mesh, override: str = '',
                 devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh of a program that reads a run (evaluation, export): `override` ('data=..,fsdp=..')
  when given; else the config's mesh if it fits the devices here; else every device on the data
  axis. A run trained on 4 devices is thus read on 1."""
  devices = list(devices if devices is not None else jax.devices())
  if override:
    return make_mesh(**parse_mesh(override, len(devices)), devices=devices)
  try:
    return make_mesh(**dict(config_mesh), devices=devices)
  except ConfigError as e:
    logging.info('%s; using all %d devices on the data axis instead', e, len(devices))
    return make_mesh(devices=devices)


def named(mesh: jax.sharding.Mesh, axes: Sequence[str | None]) -> NamedSharding:
  """A NamedSharding on `mesh` for logical `axes` under the current rules."""
  return NamedSharding(mesh, logical_to_spec(axes, mesh_axis_names=mesh.axis_names))


def variable_spec(v: nnx.Variable, mesh: jax.sharding.Mesh) -> P:
  """The PartitionSpec of a variable from its logical `out_sharding` metadata."""
  axes = v.get_metadata().get('out_sharding')
  if not axes:
    return P()
  return logical_to_spec(axes, mesh_axis_names=mesh.axis_names)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
  """NamedShardings for every variable of an (abstract or concrete) state."""
  return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, variable_spec(v, mesh))), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(init_fn, mesh: jax.sharding.Mesh):
  """(graphdef, abstract state) with concrete NamedShardings on `mesh`; nothing is allocated."""
  with axis_rules(current_rules()):
    graphdef, abstract = nnx.get_abstract_model(init_fn, mesh)
  # flax's rule lookup does not know our 'each mesh axis once' resolution; ours is authoritative.
  def with_sharding(v):
    value = v.get_value()
    sharding = NamedSharding(mesh, variable_spec(v, mesh))
    return v.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

  abstract = jax.tree.map(with_sharding, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, abstract


def create_sharded(init_fn, mesh: jax.sharding.Mesh):
  """Builds a model with every array created directly in its shard: no host holds the whole model."""
  graphdef, abstract = abstract_model(init_fn, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  rules = current_rules()

  def init():
    with axis_rules(rules):
      return nnx.state(init_fn())

  with jax.set_mesh(mesh):
    # Init runs once and is random-number bound: skip the backend's costly optimisation passes.
    init_fn = jax.jit(init, out_shardings=shardings).lower().compile(
        compiler_options={'xla_backend_optimization_level': 0})
    state = init_fn()
  return nnx.merge(graphdef, state)
