"""BEST-RQ self-supervised pre-training: a base from unlabeled audio (transcripts ignored).

  python launch/pretrain.py --config=configs/pretrain.py --workdir=runs/pretrain     # demo size
  python launch/pretrain.py --config=configs/pretrain.py:tiny --workdir=/tmp/pt      # seconds
  python launch/plan.py --config=configs/pretrain.py:model=2b --devices=64           # memory

The demo's model, features and data (configs/demo.py) pre-trained on the audio of the `source`
domain; `model=<preset>` takes a preset of configs/adapt.py instead (the giant ones on
LibriSpeech audio), `data=<dataset>` another dataset. The run writes <workdir>/base/encoder,
which launch/train.py, the study and the planner take through `base.path`. `ssl` holds BEST-RQ's
quantizer and masking, `ssl_pretrain` the stage (dataset, steps, optimizer); every field is
overridable, e.g. --config.ssl.codebook_size=8192.
"""

import os

from tpa_jax import config as config_lib
from tpa_jax.config.files import load_config_file, parse_arg
from tpa_jax.config import ssl as pretrain

KEYS = ('model', 'data')
VARIANTS = ('tiny', 'model=2b')


def _demo_config(arg=None):
  demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py')
  return load_config_file(demo + (f':{arg}' if arg else ''))


def get_config(arg=None):
  args = parse_arg(arg) if arg not in (None, '', 'tiny') else {}
  unknown = sorted(set(args) - set(KEYS))
  if unknown:
    raise ValueError(f"configs/pretrain.py takes no argument, 'tiny', or keys {KEYS}; got "
                     f'{unknown} in {arg!r}')
  c = _demo_config('tiny' if arg == 'tiny' else None)
  pretrain.demo_fields(c)
  if arg == 'tiny':  # seconds (tests): the tiny corpus and model
    pretrain.tiny_fields(c)
    c.checkpoint.every_steps = 4
  if 'model' in args:
    model = args['model']
    if model not in config_lib.MODEL_PRESETS:
      raise ValueError(f'model={model!r}: accepted presets are {tuple(config_lib.MODEL_PRESETS)}')
    preset = config_lib.adapt_config(f'model={model},method=full')
    c.model = preset.model
    c.train.frozen_dtype = preset.train.frozen_dtype
    if model not in ('tiny', 'demo', 'bench'):
      c.ssl.update(dict(codebook_size=8192, mask_prob=0.01))  # the paper's
      c.ssl_pretrain.dataset = 'librispeech'
  if 'data' in args:
    c.ssl_pretrain.dataset = args['data']
  return pretrain.pretrain_config(c)
