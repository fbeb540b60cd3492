"""A tiny TPA run on the synthetic task: trains in seconds on a CPU (tests and smoke runs).

  python launch/train.py --config=configs/tiny.py --workdir=runs/tiny
  python launch/train.py --config=configs/tiny.py --workdir=runs/tiny \
      --config.train.num_steps=200 --config.checkpoint.every_steps=20   # resumes from step 40
"""

from tpa_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.adapt_config('model=tiny,method=tpa' + (',' + arg if arg else ''))
  config.head.vocab_size = 6  # five tokens, each a 16-bin band of the synthetic features
  config.train.num_steps = 40
  config.train.batch_size = 8
  config.train.log_every_steps = 10
  config.checkpoint.every_steps = 10
  config.optim.learning_rate = 1e-2
  config.optim.warmup_steps = 4
  config.data.num_frames = 64
  config.data.num_labels = 6
  return config
