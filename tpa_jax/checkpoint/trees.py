"""Trees as nested dicts of named arrays: the structure orbax stores, independent of Python
classes, and abstract restore targets."""

from __future__ import annotations

import jax


def _key_name(key) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def named_leaves(tree) -> list[tuple[tuple[str, ...], object]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def nest(named: list[tuple[tuple[str, ...], object]]) -> dict:
  """(path names, leaf) pairs as nested dicts (a leaf without a path is named 'value')."""
  out: dict = {}
  for names, leaf in named:
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1] if names else 'value'] = leaf
  return out


def to_nested(tree) -> dict:
  """Any pytree (nnx.State, optax states, dataclasses) as nested dicts of its leaves keyed by
  their path names: the structure orbax stores, independent of Python classes."""
  return nest(named_leaves(tree))


def from_nested(target, nested: dict):
  """`target`'s tree structure with its leaves taken from `nested` (as `to_nested` wrote it)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  leaves = []
  for path, _ in paths:
    node = nested
    for name in [_key_name(k) for k in path] or ['value']:
      node = node[name]
    leaves.append(node)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract(tree):
  """ShapeDtypeStructs with the shardings of `tree`'s arrays (an orbax restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)
