"""Host memory of loading a giant base for TPA: the stored frozen weights against the growth of the
process's peak RSS while the trainer is built over them.

Usage:
  python benchmarks/load_base.py                      # 600m preset: 581 M parameters, bf16 base
  python benchmarks/load_base.py --preset=tiny --workdir=/tmp/load_base_tiny   # seconds

A separate process saves the base once (frozen weights in bf16) in --workdir. Then a fresh
process builds the TPA trainer over it as `launch/train.py` does (`trainer.from_config`: the
frozen weights restored straight into their shards in their stored dtype, adapters and head
initialised) and prints one JSON line: `base_bytes` (bytes of the stored frozen weights),
`peak_rss_increase_bytes` (the process's peak RSS after the trainer is built, minus its RSS
before; the kernel's peak counter is reset first) and `ratio`, the second over the first.
One CPU device.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = ' '.join(
    [f for f in os.environ.get('XLA_FLAGS', '').split()
     if not f.startswith('--xla_force_host_platform_device_count')] +
    ['--xla_force_host_platform_device_count=1'])

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def _config(preset: str):
  from tpa_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.adapt_config(f'model={preset},method=tpa')
  config.train.frozen_dtype = 'bfloat16'
  config.model.param_dtype = 'float32'
  return config


def _rss_bytes(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f'/proc/self/status has no {field}')


def save(preset: str, path: str) -> None:
  """Initialises the model of `preset` and saves its base with frozen weights in bf16."""
  import jax  # pylint: disable=import-outside-toplevel
  from tpa_jax import checkpoint, sharding  # pylint: disable=import-outside-toplevel
  from tpa_jax.nn import build  # pylint: disable=import-outside-toplevel
  from tpa_jax.train import partition  # pylint: disable=import-outside-toplevel
  config = _config(preset)
  model = build.create_model(config, sharding.make_mesh(devices=jax.devices()[:1]))
  base = partition.cast(checkpoint.base_state(model), jax.numpy.bfloat16)
  checkpoint.save_state(path, base, metadata={'preset': preset})


def load(preset: str, path: str) -> dict:
  """Builds the TPA trainer over the base at `path`; returns the memory figures."""
  import jax  # pylint: disable=import-outside-toplevel
  from tpa_jax import checkpoint, sharding  # pylint: disable=import-outside-toplevel
  from tpa_jax.train import partition  # pylint: disable=import-outside-toplevel
  from tpa_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  config = _config(preset)
  config.base.path = path
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  jax.block_until_ready(jax.numpy.zeros(()))  # the backend is up before the baseline
  dtypes = jax.tree.leaves(checkpoint.stored_dtypes(path))
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # resets the peak RSS (VmHWM) to the current RSS
  before = _rss_bytes('VmRSS')
  start = time.perf_counter()
  trainer = trainer_lib.from_config(config, mesh)
  jax.block_until_ready((trainer.state, trainer.frozen, trainer.rest))
  seconds = time.perf_counter() - start
  peak = _rss_bytes('VmHWM')
  base_bytes = sum(x.nbytes for x in jax.tree.leaves((trainer.frozen, trainer.rest)))
  frozen_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(trainer.frozen)})
  return {'preset': preset, 'base_params': partition.count_params(trainer.frozen),
          'stored_dtypes': sorted({str(d) for d in dtypes}), 'frozen_dtypes': frozen_dtypes,
          'trainable_params': partition.count_params(trainer.state.trainable),
          'base_bytes': base_bytes, 'rss_before_bytes': before,
          'peak_rss_increase_bytes': peak - before, 'ratio': (peak - before) / base_bytes,
          'build_seconds': round(seconds, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='600m')
  parser.add_argument('--workdir', default='runs/load_base')
  parser.add_argument('--stage', choices=('all', 'save', 'load'), default='all',
                      help='(internal: each stage runs in its own process)')
  args = parser.parse_args()
  path = os.path.abspath(os.path.join(args.workdir, f'base-{args.preset}'))
  if args.stage == 'save':
    save(args.preset, path)
  elif args.stage == 'load':
    print(json.dumps(load(args.preset, path)), flush=True)
  else:
    os.makedirs(args.workdir, exist_ok=True)
    me = [sys.executable, os.path.abspath(__file__), f'--preset={args.preset}',
          f'--workdir={args.workdir}']
    if not os.path.isdir(path):
      subprocess.run(me + ['--stage=save'], check=True)
    subprocess.run(me + ['--stage=load'], check=True)


if __name__ == '__main__':
  main()
