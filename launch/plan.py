"""Plan the memory of a train step before renting the chips: compile it for N simulated devices.

Usage:
  python launch/plan.py --config=configs/adapt.py:model=2b,method=tpa --devices=64 --accelerator=v5e
  python launch/plan.py --config=configs/adapt.py:model=8b,method=full --accelerator=v5e \
      --sweep=1,2,4,8,16,32,64          # the smallest slice it fits: stops at the first that does
  python launch/plan.py --config=configs/adapt.py:model=600m,method=tpa --devices=8 \
      --mesh=data=2,fsdp=-1 --config.train.grad_accum_steps=4 --per_device_batch=4

The real train step of the config (tpa_jax/train/step.py, built by tpa_jax/train/trainer.py
with its shardings and dtypes) is lowered and compiled ahead of time on abstract inputs: nothing
is allocated, so a 8B-parameter step plans on a laptop. The batch holds `--per_device_batch` utterances of `--seconds` of int16
audio per device and micro-batch (features are computed on device, as in training); the default
mesh is fsdp over every device. Prints a table of per-device bytes (weights, gradients,
optimizer state, temp: everything else the step holds) and whether it fits each accelerator,
then, as its last line, one JSON object: the plan (`per_device_bytes`, `accelerator_bytes`,
`fits`, `flops_per_step`, `mesh`, ...), or with --sweep {"sweep": [plans], "smallest_slice":
{accelerator: devices}}. Runs on CPU whatever the machine has.
"""

import os
import sys


def _simulated_devices(argv: list[str]) -> int:
  """--devices, or the largest --sweep count if larger: read from the command line before jax is
  imported, since the number of simulated CPU devices is fixed when jax starts. Values absl
  would reject are left for it to report."""
  values = {}
  for i, arg in enumerate(argv):
    for name in ('devices', 'sweep'):
      if arg.startswith(f'--{name}='):
        values[name] = arg.split('=', 1)[1]
      elif arg == f'--{name}' and i + 1 < len(argv):
        values[name] = argv[i + 1]
  counts = [8]
  try:
    counts = [int(values.get('devices', 8))]
    counts += [int(v) for v in values.get('sweep', '').split(',') if v.strip()]
  except ValueError:
    pass
  return max(max(counts), 1)


os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = ' '.join(
    [f for f in os.environ.get('XLA_FLAGS', '').split()
     if not f.startswith('--xla_force_host_platform_device_count')] +
    [f'--xla_force_host_platform_device_count={_simulated_devices(sys.argv)}'])

import json  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tpa_jax.plan import planner  # noqa: E402
from tpa_jax.programs import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer('devices', 8, 'Simulated devices (chips) of the slice.',
                                lower_bound=1)
_ACCELERATOR = flags.DEFINE_enum('accelerator', 'v5e', list(planner.ACCELERATORS),
                                 'Chip whose memory the plan must fit.')
_MESH = flags.DEFINE_string('mesh', planner.DEFAULT_MESH,
                            'Mesh axis sizes, data=..,fsdp=..,tensor=..; one may be -1 (the rest).')
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    'per_device_batch', 8, 'Utterances per device and micro-batch; 0 takes train.batch_size as '
    'the global batch.', lower_bound=0)
_SECONDS = flags.DEFINE_float('seconds', 30.0, 'Seconds of audio per utterance.')
_SWEEP = flags.DEFINE_list('sweep', [], 'Device counts to plan in turn (e.g. 1,2,4,8); stops at '
                           'the first on which the step fits --accelerator.')
_FLOPS = flags.DEFINE_bool('flops', True, 'Also count FLOPs (lowers the step with the layer '
                           'loop unrolled).')
flags.mark_flags_as_required(['config'])


def main(argv):
  # Steps are compiled, never run: the simulated devices' collectives need no thread pool.
  cli.start(argv, size_threads=False)
  config, accelerator = _CONFIG.value, _ACCELERATOR.value
  try:
    counts = sorted({int(n) for n in _SWEEP.value}) or [_DEVICES.value]
  except ValueError:
    raise app.UsageError(f'--sweep={",".join(_SWEEP.value)}: accepted values are device '
                         'counts such as 1,2,4,8') from None
  if counts[0] < 1:
    raise app.UsageError(f'--sweep: device counts must be positive, got {counts[0]}')
  # Every mesh and batch is checked before anything is compiled.
  for n in counts:
    sizes = planner.parse_mesh(_MESH.value, n)
    planner.check_batch_size(config, sizes, _PER_DEVICE_BATCH.value)

  plans = []
  for n in counts:
    plans.append(planner.plan(config, jax.devices()[:n], mesh=_MESH.value,
                              per_device_batch=_PER_DEVICE_BATCH.value, seconds=_SECONDS.value,
                              count_flops=_FLOPS.value))
    print(planner.format_table(plans[-1:]).splitlines()[-1] if len(plans) > 1 else
          planner.format_table(plans[-1:]), flush=True)
    if _SWEEP.value and plans[-1].fits(accelerator):
      break
  if not _SWEEP.value:
    print(json.dumps(plans[0].to_json(accelerator)))
    return
  print(json.dumps({
      'accelerator': accelerator,
      'sweep': [p.to_json(accelerator) for p in plans],
      'smallest_slice': {a: planner.smallest_fitting(plans, a) for a in planner.ACCELERATORS},
  }))


if __name__ == '__main__':
  cli.run(main)
