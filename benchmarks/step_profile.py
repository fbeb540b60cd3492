"""Where a train step's work goes: FLOPs and bytes of its jaxpr, by the model code that made them.

Usage (abstract shapes only: no weights are built and nothing runs, so 600m fits a laptop):
  python benchmarks/step_profile.py --preset=600m --method=tpa --seconds=30 --per_device_batch=8
  python benchmarks/step_profile.py --preset=tiny --seconds=2 --per_device_batch=1   # smoke run

Every equation of the step (forward and backward: a transposed operation keeps the source line
of the one it came from) is charged to the innermost tpa_jax function on its traceback, as
`file:Class.method` (the generic layers, Dense and LayerNorm, charged to their caller), each
scan body once per iteration; the step is the one that runs, rematerialisation included. Per group: the matrix-product and
convolution FLOPs, and the bytes its equations write (every output, the proxy for memory traffic
that bounds element-wise work on an accelerator). `roofline_ms` adds the two at a device's dense
bf16 peak and memory bandwidth, with bytes unfused (XLA fuses element-wise chains, so they are an
upper bound, loosest for the blockwise attentions whose per-block work fuses) (--peak_tflops, --hbm_tb_s: an H100 SXM's by default), an
estimate of where time goes, not a measurement: the device's own trace is
`train_step.py --trace_dir`. One JSON line per group, largest first, then a total.
"""

import argparse
import ast
import collections
import functools
import json
import math
import os

import jax
from jax._src import source_info_util

from tpa_jax import sharding
from tpa_jax.plan import costs
from tpa_jax.train import trainer as trainer_lib

from train_step import impl_config, random_batch

_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tpa_jax')
_CONTAINERS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Building blocks every module uses: their work is charged to the module that called them.
_GENERIC = ('nn/layers.py', 'sharding.py')


@functools.cache
def _scopes(path: str) -> list[tuple[int, int, str]]:
  """(first line, last line, 'Class.method') of every function and class of a source file."""
  tree = ast.parse(open(path, encoding='utf-8').read())
  found = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, _CONTAINERS):
        name = f'{prefix}.{child.name}' if prefix else child.name
        found.append((child.lineno, child.end_lineno, name))
        visit(child, name)
  visit(tree, '')
  return found


def owner(eqn) -> str:
  """`file:Class.method` of the innermost tpa_jax frame that made an equation (past the generic
  layers: a Dense of a feed-forward module is the feed-forward module's)."""
  for frame in source_info_util.user_frames(eqn.source_info.traceback):
    if frame.file_name.startswith(_PACKAGE) and not frame.file_name.endswith(_GENERIC):
      inner = [s for s in _scopes(frame.file_name) if s[0] <= frame.start_line <= s[1]]
      name = max(inner)[2] if inner else '<module>'
      return f'{os.path.relpath(frame.file_name, _PACKAGE)}:{name}'
  return '<outside tpa_jax>'


def _flops(eqn) -> float:
  if eqn.primitive.name == 'dot_general':
    (contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)
  if eqn.primitive.name == 'conv_general_dilated':
    rhs, spec = eqn.invars[1].aval, eqn.params['dimension_numbers'].rhs_spec
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs.shape[d] for d in spec[1:])
  return 0.0


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def charge(jaxpr, totals, times: float = 1.0) -> None:
  """Adds each equation's FLOPs and output bytes to its owner's totals, `times` over."""
  for eqn in jaxpr.eqns:
    subs = list(_sub_jaxprs(eqn.params))
    if subs:  # scan, remat, pjit, custom_vjp, cond: charge the bodies (a cond's first branch)
      repeat = times * eqn.params.get('length', 1)
      for sub in subs[:1] if eqn.primitive.name == 'cond' else subs:
        charge(sub, totals, repeat)
      continue
    group = totals[owner(eqn)]
    group['flops'] += times * _flops(eqn)
    group['bytes'] += times * sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars
                                  if hasattr(v.aval, 'dtype'))
    group['equations'] += 1


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='600m')
  parser.add_argument('--method', default='tpa')
  parser.add_argument('--attention_impl', default='xla')
  parser.add_argument('--per_device_batch', type=int, default=8)
  parser.add_argument('--seconds', type=float, default=30.0)
  parser.add_argument('--set', action='append', default=[], help='a config override (repeatable)')
  parser.add_argument('--peak_tflops', type=float, default=989.0)
  parser.add_argument('--hbm_tb_s', type=float, default=3.35, help='memory bandwidth, TB/s')
  parser.add_argument('--top', type=int, default=15, help='groups printed, largest first')
  args = parser.parse_args()
  config, _ = impl_config(args.preset, args.method, args.attention_impl, args)
  mesh = sharding.make_mesh(data=1, fsdp=-1)
  shapes = trainer_lib.from_config(config, mesh, abstract=True)
  batch = shapes.global_batch(random_batch(config, args.per_device_batch * mesh.size,
                                           args.seconds))
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(shapes.step_fn)(shapes.state, shapes.frozen, shapes.rest, batch).jaxpr
  totals = collections.defaultdict(lambda: {'flops': 0.0, 'bytes': 0.0, 'equations': 0})
  charge(jaxpr, totals)

  def roofline_ms(g):
    return 1e3 * (g['flops'] / (args.peak_tflops * 1e12) + g['bytes'] / (args.hbm_tb_s * 1e12))

  flops = sum(g['flops'] for g in totals.values())
  moved = sum(g['bytes'] for g in totals.values())
  ranked = sorted(totals.items(), key=lambda kv: -roofline_ms(kv[1]))
  for name, g in ranked[:args.top]:
    print(json.dumps({'group': name, 'flops': g['flops'], 'flops_share': g['flops'] / flops,
                      'bytes': g['bytes'], 'bytes_share': g['bytes'] / moved,
                      'roofline_ms': round(roofline_ms(g), 3), 'equations': g['equations']}))
  with jax.set_mesh(mesh):  # the plan's counter, over the same step: every equation once
    counted = costs.jaxpr_flops(shapes.step_fn, shapes.state, shapes.frozen, shapes.rest, batch)
  print(json.dumps({'total': True, 'preset': args.preset, 'method': args.method,
                    'attention_impl': args.attention_impl,
                    'batch': f'{args.per_device_batch * mesh.size} x {args.seconds:g} s',
                    'flops': flops, 'flops_counted_whole': counted, 'bytes': moved,
                    'groups': len(totals),
                    'roofline_ms': round(1e3 * (flops / (args.peak_tflops * 1e12) +
                                                moved / (args.hbm_tb_s * 1e12)), 3),
                    'peak_tflops': args.peak_tflops, 'hbm_tb_s': args.hbm_tb_s}))


if __name__ == '__main__':
  main()
