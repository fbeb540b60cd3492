"""Export a trained run: its adapters as safetensors, or a serving bundle.

Usage:
  python launch/export.py --workdir=runs/tiny --kind=adapter --output=runs/tiny/adapters.safetensors
  python launch/export.py --workdir=runs/tiny --kind=serving --output=runs/tiny/serving
  python launch/export.py --workdir=runs/tiny --kind=adapter --output=a.safetensors --mesh=data=1
  python launch/export.py --kind=serving --config=configs/demo.py \
      --config.base.path=runs/demo/base/encoder --adapters=es=es.safetensors,lid=lid.safetensors \
      --capacity=16 --output=runs/multitask-serving

adapter: the trained arrays (adapters + head) as flat named tensors with the adapter spec that
re-attaching them checks (placement, resolved blocks, bottleneck, residual weight, activation,
norm, init, head, base fingerprint). serving: a directory with the
inference function (features -> logits) serialised by jax.export, the weights it needs, and a
manifest; `tpa_jax/serve/serving_loader.py` runs it without the rest of tpa_jax. Both come from the
newest committed checkpoint in --workdir. With --adapters (and --config naming the base), serving
writes a multi-task bundle instead: the base once, and a function that takes an adapter bank
of --capacity slots (laid out for the kinds of task of --adapters), each row's task slot and
utterance; `serving_loader.MultiTaskBundle` adds tasks from their adapter exports alone.
"""

import json

import jax
from absl import flags
from ml_collections import config_flags

from tpa_jax import sharding
from tpa_jax.serve import export, multitask
from tpa_jax.programs import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (with checkpoints/).')
_KIND = flags.DEFINE_enum('kind', 'adapter', ['adapter', 'serving'], 'What to export.')
_OUTPUT = flags.DEFINE_string('output', None, 'File (adapter) or directory (serving) to write.')
_PLATFORMS = flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'],
                               'serving: the platforms the bundle is lowered for.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'multi-task serving: the config of the base (with --config.base.path).',
    lock_config=True)
_ADAPTERS = flags.DEFINE_string('adapters', '', 'multi-task serving: NAME=FILE[,...] adapter '
                                'exports whose kinds of task the bank holds.')
_CAPACITY = flags.DEFINE_integer('capacity', 16, 'multi-task serving: task slots of the bank.')
_MESH = flags.DEFINE_string('mesh', '', 'Mesh axis sizes (data=..,fsdp=..,tensor=..; one may be '
                            '-1). Default: every device here on the data axis, whatever mesh '
                            'trained the run.')
flags.mark_flags_as_required(['output'])


def main(argv):
  cli.start(argv)
  mesh = sharding.make_mesh(**sharding.parse_mesh(_MESH.value or 'data=-1', len(jax.devices())))
  if _ADAPTERS.value:
    if _KIND.value != 'serving' or _CONFIG.value is None or not _CONFIG.value.base.path:
      cli.fail('--adapters writes a multi-task serving bundle: it needs --kind=serving and '
               '--config with --config.base.path=<the base the adapters were trained on>')
    summary = export.export_multitask(_CONFIG.value, multitask.parse_adapters(_ADAPTERS.value),
                                      _OUTPUT.value, capacity=_CAPACITY.value,
                                      platforms=_PLATFORMS.value)
  elif not _WORKDIR.value:
    cli.fail('--workdir is required (the run to export), or --adapters with --config for a '
             'multi-task serving bundle')
  elif _KIND.value == 'adapter':
    summary = export.export_adapters(_WORKDIR.value, _OUTPUT.value, mesh)
  else:
    summary = export.export_serving(_WORKDIR.value, _OUTPUT.value, _PLATFORMS.value, mesh)
  print(json.dumps(summary, default=str))


if __name__ == '__main__':
  cli.run(main)
