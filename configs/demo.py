"""`make demo` until the speech corpus lands: TPA on the demo conformer, synthetic task.

The base is randomly initialised and frozen; TPA adapters and a CTC head learn to read token
sequences rendered as spectral bands (tpa_jax/synthetic.py). No download, CPU friendly.
"""

from tpa_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.adapt_config('model=demo,method=tpa' + (',' + arg if arg else ''))
  config.head.vocab_size = 9  # eight tokens, each a 10-bin band of the synthetic features
  config.adapter.bottleneck = 32
  config.train.num_steps = 150
  config.train.batch_size = 8
  config.train.log_every_steps = 25
  config.optim.learning_rate = 5e-3
  config.optim.warmup_steps = 10
  config.data.num_frames = 128
  config.data.num_labels = 12
  return config
