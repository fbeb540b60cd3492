"""Cost of one train step for full fine-tuning, TPA, TPA on the upper half, and block_sequential.

Usage:
  python benchmarks/step_cost.py                 # 8 blocks x 256, 200+ frames after subsampling
  python benchmarks/step_cost.py --preset=tiny --steps=2   # a quick smoke run

Prints one JSON object per method. FLOPs come from `lower(...).cost_analysis()` of the same step
built with the layer loop unrolled, so every block (and its scan body) is counted once per layer.
Memory is `memory_analysis()` of the compiled (scanned) step; times are medians after warm-up.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tpa_jax import config as config_lib  # noqa: E402
from tpa_jax import sharding  # noqa: E402
from tpa_jax.data import random_task  # noqa: E402
from tpa_jax.plan import costs  # noqa: E402
from tpa_jax.train import partition  # noqa: E402
from tpa_jax.train import trainer as trainer_lib  # noqa: E402


def make_trainer(config, mesh):
  """The trainer launch/train.py builds, with frozen weights stored in bf16."""
  config.train.frozen_dtype = 'bfloat16'
  return trainer_lib.from_config(config, mesh)


def measure(preset: str, method: str, batch: dict, steps: int, mesh) -> dict:
  config = costs.method_config(preset, method)
  trainer = make_trainer(config, mesh)
  compiled = trainer.lower(batch).compile()
  memory = compiled.memory_analysis()
  unrolled_config = costs.method_config(preset, method)
  unrolled_config.model.scan_layers = False
  flops = costs.lowered_flops(make_trainer(unrolled_config, mesh).lower(batch))
  state_bytes = costs.weight_state_bytes(trainer)
  jax.block_until_ready(trainer.step(batch))  # warm-up (compiles the cached executable)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(trainer.step(batch))
    times.append(time.perf_counter() - start)
  return {
      'method': method,
      'trainable_params': partition.count_params(trainer.state.trainable),
      'total_params': partition.count_params(trainer.state.trainable) +
                      partition.count_params(trainer.frozen),
      'lowered_flops': flops,
      'weight_state_bytes': state_bytes['total'],
      'temp_bytes': int(memory.temp_size_in_bytes),
      'step_seconds_median': statistics.median(times),
      'frozen_prefix_blocks': trainer.frozen_depth,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='bench', choices=sorted(config_lib.MODEL_PRESETS))
  parser.add_argument('--frames', type=int, default=808, help='input frames (x4 subsampling)')
  parser.add_argument('--batch_size', type=int, default=2)
  parser.add_argument('--steps', type=int, default=3, help='timed steps per method')
  parser.add_argument('--methods', default='full,tpa,tpa_upper_half,block_sequential')
  args = parser.parse_args()

  config = costs.method_config(args.preset, 'full')
  batch = random_task.ctc_batch(np.random.default_rng(0), batch_size=args.batch_size,
                              num_frames=args.frames, input_dim=config.model.frontend.input_dim,
                              vocab_size=config.head.vocab_size, num_labels=32,
                              frames_per_token=16, min_fraction=1.0)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  results = [measure(args.preset, m, batch, args.steps, mesh) for m in args.methods.split(',')]
  full = next((r for r in results if r['method'] == 'full'), None)
  for r in results:
    if full is not None:
      r['flops_ratio_vs_full'] = r['lowered_flops'] / full['lowered_flops']
      r['weight_state_ratio_vs_full'] = r['weight_state_bytes'] / full['weight_state_bytes']
      r['step_time_ratio_vs_full'] = r['step_seconds_median'] / full['step_seconds_median']
    print(json.dumps(r), flush=True)


if __name__ == '__main__':
  main()
