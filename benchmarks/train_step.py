"""Step time, model FLOP utilisation and memory of the real train step on the devices present.

Usage (on an accelerator; one JSON line per method):
  python benchmarks/train_step.py --preset=600m --methods=full,tpa,tpa_upper_half \
      --per_device_batch=8 --seconds=30
  python benchmarks/train_step.py --preset=tiny --seconds=2 --steps=2     # a CPU smoke run
  python benchmarks/train_step.py --methods=tpa --set model.position=none  # an ablation
  python benchmarks/train_step.py --methods=tpa --attention_impls=xla,chunked
  python benchmarks/train_step.py --methods=tpa,full:xla    # full with xla only (METHOD:IMPL+IMPL)
  (an implementation that falls back to one already measured, cudnn on CPU say, prints a line
  naming it, `same_as`, instead of measuring it again)

The trainer is the one `launch/train.py` builds (`trainer.from_config`, weights initialised from
the seed, frozen weights stored in bf16), the batch holds `--per_device_batch` utterances of
`--seconds` of random int16 audio per device with CTC labels, and log-mel features are computed
inside the step. `model_flops` counts the matrix products and convolutions of one step without
rematerialisation (every scanned layer counted) and with the reference attention (`xla`: the
chunked attention's recomputation and its wider positional blocks are not model FLOPs); `mfu` is model_flops / step time / (devices x
the device's dense bf16 peak: H100 / H200 SXM 989 TFLOP/s, TPU v5e 197, v5p 459; `--peak_tflops`
for another). Memory: the compiled step's argument and temp bytes per device, and the
device's peak bytes in use after the timed steps (where the backend reports it).
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from tpa_jax import config as config_lib
from tpa_jax import sharding
from tpa_jax.nn import attention
from tpa_jax.plan import costs, planner
from tpa_jax.train import partition
from tpa_jax.train import trainer as trainer_lib


# Dense bf16 peak of one device, TFLOP/s, by a word of its device kind (SXM parts for NVIDIA).
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'v5 lite': 197.0, 'v5e': 197.0, 'v5p': 459.0}


def peak_tflops(device_kind: str) -> float | None:
  """The table's peak for a device kind ('NVIDIA H200', 'TPU v5 lite'), None where unknown."""
  for word, peak in PEAK_TFLOPS.items():
    if word.lower() in device_kind.lower():
      return peak
  return None


def method_config(preset: str, method: str, overrides: dict[str, str]):
  config = costs.method_config(preset, method)
  config.data.name = 'synthetic_speech/source'  # audio batches: features on device
  config.train.frozen_dtype = 'bfloat16'
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == 'True'
  return config


def random_batch(config, batch_size: int, seconds: float, seed: int = 0) -> dict:
  """A batch of the shapes `planner.abstract_batch` gives, with random audio and labels."""
  rng = np.random.default_rng(seed)
  shapes = planner.abstract_batch(config, batch_size, seconds)
  samples = shapes['audio'].shape[1]
  labels = shapes['labels'].shape[1]
  return {
      'audio': rng.integers(-8000, 8000, (batch_size, samples), dtype=np.int16),
      'audio_lengths': np.full((batch_size,), samples, np.int32),
      'labels': rng.integers(1, config.head.vocab_size, (batch_size, labels), dtype=np.int32),
      'label_mask': np.arange(labels)[None, :] < rng.integers(labels // 2, labels + 1,
                                                              (batch_size, 1)),
  }


def attention_ran(config) -> str:
  """The attention implementation that runs: 'auto' resolved, an unsupported one replaced by
  its fallback."""
  return attention.resolve_impl(config.model.attention_impl, dtype=config.model.dtype,
                                head_dim=config.model.dim // config.model.num_heads, t=1)


def impl_config(preset: str, method: str, attention_impl: str, args):
  overrides = dict(kv.split('=', 1) for kv in args.set)
  overrides['model.attention_impl'] = attention_impl
  return method_config(preset, method, overrides), overrides


def measure(preset: str, method: str, attention_impl: str, args, mesh) -> dict:
  config, overrides = impl_config(preset, method, attention_impl, args)
  batch_size = args.per_device_batch * mesh.size
  batch = random_batch(config, batch_size, args.seconds)
  start = time.perf_counter()
  trainer = trainer_lib.from_config(config, mesh)
  build_seconds = time.perf_counter() - start
  global_batch = trainer.global_batch(batch)
  start = time.perf_counter()
  compiled = trainer.compile(global_batch)
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  # Model FLOPs: the same step without rematerialisation, counted on its jaxpr.
  plain = method_config(preset, method, overrides)
  plain.model.remat_policy = 'none'
  plain.model.attention_impl = 'xla'
  shapes = trainer_lib.from_config(plain, mesh, abstract=True)
  with jax.set_mesh(mesh):
    flops = costs.jaxpr_flops(shapes.step_fn, shapes.state, shapes.frozen, shapes.rest,
                              global_batch)
  jax.block_until_ready(trainer.step(global_batch))  # warm-up
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(trainer.step(global_batch))
    times.append(time.perf_counter() - start)
  step_seconds = statistics.median(times)
  if args.trace_dir:  # one more step under the profiler, after the timed ones
    with jax.profiler.trace(os.path.join(args.trace_dir, f'{method}-{attention_impl}')):
      jax.block_until_ready(trainer.step(global_batch))
  peak = args.peak_tflops or peak_tflops(jax.devices()[0].device_kind)
  stats = jax.devices()[0].memory_stats() or {}
  return {
      'method': method, 'attention_impl': attention_impl,
      # What ran: 'auto' resolved, an unsupported 'cudnn' replaced by its fallback.
      'attention_ran': attention_ran(config),
      'preset': preset,
      'overrides': overrides,
      'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind, 'devices': mesh.size,
      'batch': f'{batch_size} x {args.seconds:g} s',
      'trainable_params': partition.count_params(trainer.state.trainable),
      'total_params': partition.count_params(trainer.state.trainable) +
                      partition.count_params(trainer.frozen),
      'build_seconds': round(build_seconds, 2), 'compile_seconds': round(compile_seconds, 2),
      'step_seconds_median': step_seconds, 'step_seconds': [round(t, 4) for t in times],
      'model_flops': flops,
      'audio_seconds_per_second': batch_size * args.seconds / step_seconds,
      'peak_tflops': peak,
      'mfu': flops / step_seconds / (mesh.size * peak * 1e12) if peak else None,
      'argument_bytes': int(memory.argument_size_in_bytes),
      'temp_bytes': int(memory.temp_size_in_bytes),
      'peak_bytes_in_use': stats.get('peak_bytes_in_use'),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='600m', choices=sorted(config_lib.MODEL_PRESETS))
  parser.add_argument('--methods', default='full,tpa,tpa_upper_half',
                      help='comma-separated; METHOD:IMPL+IMPL measures that method with those '
                           'attention implementations instead of --attention_impls')
  parser.add_argument('--attention_impls', default='xla',
                      help='model.attention_impl values, each measured for every method')
  parser.add_argument('--per_device_batch', type=int, default=8)
  parser.add_argument('--seconds', type=float, default=30.0)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per method')
  parser.add_argument('--set', action='append', default=[],
                      help='a config override, e.g. --set model.position=none (repeatable)')
  parser.add_argument('--trace_dir', default='',
                      help='write a jax.profiler trace of one step per method and implementation '
                           'under this folder (METHOD-IMPL/, for TensorBoard or Perfetto)')
  parser.add_argument('--peak_tflops', type=float, default=0.0,
                      help='dense bf16 TFLOP/s of one device; 0: from PEAK_TFLOPS by device kind')
  args = parser.parse_args()
  mesh = sharding.make_mesh(data=1, fsdp=-1)
  for entry in args.methods.split(','):
    method, _, own = entry.partition(':')
    measured = {}  # implementation that ran -> the first attention_impl that ran it
    for impl in (own.split('+') if own else args.attention_impls.split(',')):
      ran = attention_ran(impl_config(args.preset, method, impl, args)[0])
      if ran in measured:  # a fallback to one already measured: device time is not spent twice
        print(json.dumps({'method': method, 'attention_impl': impl, 'attention_ran': ran,
                          'same_as': measured[ran]}), flush=True)
        continue
      measured[ran] = impl
      print(json.dumps(measure(args.preset, method, impl, args, mesh)), flush=True)


if __name__ == '__main__':
  main()
