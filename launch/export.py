"""Export a trained run: its adapters as safetensors, or a serving bundle.

Usage:
  python launch/export.py --workdir=runs/tiny --kind=adapter --output=runs/tiny/adapters.safetensors
  python launch/export.py --workdir=runs/tiny --kind=serving --output=runs/tiny/serving

adapter: the trained arrays (adapters + head) as flat named tensors with the metadata needed to
re-attach them (placement, blocks, bottleneck, base fingerprint). serving: a directory with the
inference function (features -> logits) serialised by jax.export, the weights it needs, and a
manifest; `tpa_jax/serving_loader.py` runs it without the rest of tpa_jax. Both come from the
newest committed checkpoint in --workdir.
"""

import json

from absl import app, flags

from tpa_jax import export, training

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (with checkpoints/).')
_KIND = flags.DEFINE_enum('kind', 'adapter', ['adapter', 'serving'], 'What to export.')
_OUTPUT = flags.DEFINE_string('output', None, 'File (adapter) or directory (serving) to write.')
_PLATFORMS = flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'],
                               'serving: the platforms the bundle is lowered for.')
flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  training.quiet_library_logs()
  if _KIND.value == 'adapter':
    summary = export.export_adapters(_WORKDIR.value, _OUTPUT.value)
  else:
    summary = export.export_serving(_WORKDIR.value, _OUTPUT.value, _PLATFORMS.value)
  print(json.dumps(summary, default=str))


if __name__ == '__main__':
  app.run(main)
