"""The attention module alone, forward + backward, for each implementation against `xla`.

Usage (one JSON line per implementation):
  python benchmarks/attention.py --preset=600m --frames=1500 --batch=8 --dtype=bfloat16
  python benchmarks/attention.py --preset=tiny --frames=100 --batch=2 --steps=2   # a CPU smoke run

The module is the preset's `SelfAttention` (its dim, heads and position scheme) with random
weights; the timed function is the gradient of a sum of its outputs with respect to the input and
every attention weight (what full fine-tuning computes; an adapter step needs the input's part).
Each line: the median time, the compiled temp bytes, the model FLOPs of the xla attention (the
same count for every implementation), TFLOP/s at that count, and the largest difference of the
outputs and the input gradient from xla's, relative to xla's largest value.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpa_jax import config as config_lib
from tpa_jax.nn.attention import SelfAttention
from tpa_jax.plan import costs


def make_attention(preset: str, impl: str, dtype, block: int) -> SelfAttention:
  m = config_lib.MODEL_PRESETS[preset]
  with nnx.use_eager_sharding(False):
    return SelfAttention(m['dim'], m['num_heads'], position=m.get('position', 'relative_key'),
                         left_max_position=m.get('left_max_position', 64),
                         right_max_position=m.get('right_max_position', 8), impl=impl,
                         block=block, dtype=dtype, rngs=nnx.Rngs(0))


def grad_fn(attn: SelfAttention, mask_bt):
  graphdef, state = nnx.split(attn)

  def loss(state, x_btd):
    y = nnx.merge(graphdef, state)(x_btd, mask_bt)
    return y.astype(jnp.float32).sum(), y

  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)), state


def measure(args, impl: str, x_btd, mask_bt, reference=None) -> tuple[dict, tuple]:
  dtype = jnp.dtype(args.dtype)
  attn = make_attention(args.preset, impl, dtype, args.block)
  fn, state = grad_fn(attn, mask_bt)
  compiled = fn.lower(state, x_btd).compile()
  flops_attn = make_attention(args.preset, 'xla', dtype, args.block)
  flops = costs.jaxpr_flops(grad_fn(flops_attn, mask_bt)[0], state, x_btd)
  result = jax.block_until_ready(compiled(state, x_btd))  # warm-up
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, x_btd))
    times.append(time.perf_counter() - start)
  (_, dx), y = result
  outputs = (np.asarray(y, np.float32), np.asarray(dx, np.float32))
  line = {
      'benchmark': 'attention', 'attention_impl': impl, 'attention_ran': attn.resolved_impl(args.frames),
      'preset': args.preset,
      'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
      'shape': f'{args.batch} x {args.frames} frames', 'dtype': args.dtype,
      'block': args.block, 'seconds_median': statistics.median(times),
      'seconds': [round(t, 5) for t in times],
      'temp_bytes': int(compiled.memory_analysis().temp_size_in_bytes),
      'model_flops': flops, 'tflops_per_s': flops / statistics.median(times) / 1e12,
  }
  if reference is not None:
    for name, a, b in zip(('output', 'input_grad'), reference, outputs):
      line[f'{name}_max_rel_diff'] = float(np.abs(a - b).max() / np.abs(a).max())
  return line, outputs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='600m', choices=sorted(config_lib.MODEL_PRESETS))
  parser.add_argument('--impls', default='xla,chunked', help='xla first: the reference')
  parser.add_argument('--frames', type=int, default=1500, help='T after subsampling')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--block', type=int, default=128)
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  dim = config_lib.MODEL_PRESETS[args.preset]['dim']
  x_btd = jax.random.normal(jax.random.key(0), (args.batch, args.frames, dim), jnp.float32)
  lengths = np.linspace(args.frames, args.frames // 2, args.batch).astype(np.int32)
  mask_bt = jnp.asarray(np.arange(args.frames)[None] < lengths[:, None])
  reference, measured = None, {}
  for impl in args.impls.split(','):
    ran = make_attention(args.preset, impl, jnp.dtype(args.dtype), args.block).resolved_impl(
        args.frames)
    if ran in measured:  # a fallback to one already measured
      print(json.dumps({'benchmark': 'attention', 'attention_impl': impl, 'attention_ran': ran,
                        'same_as': measured[ran]}), flush=True)
      continue
    measured[ran] = impl
    line, outputs = measure(args, impl, x_btd, mask_bt, reference)
    if impl == 'xla':
      reference = outputs
    print(json.dumps(line), flush=True)


if __name__ == '__main__':
  main()
