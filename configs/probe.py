"""Layer probes of frozen bases (launch/probe.py): a linear probe on every layer of each base,
for language ID and Spanish ASR, to see where each base keeps what adapters need.

  python launch/probe.py --config=configs/probe.py --workdir=runs/probe
  python launch/probe.py --config=configs/probe.py --workdir=runs/probe \\
      --bases=random,supervised,best_rq@1500,best_rq@3000,best_rq@6000
  python launch/probe.py --config=configs/probe.py:tiny --workdir=/tmp/probe        # tests

The model, features, data and BEST-RQ stage are the study's `ssl` variant's (configs/study.py),
so `best_rq`, `random` and `supervised` are the bases that study adapts. `supervised` and
`best_rq` are cached where the study caches them (under `--config.study.base_workdir`, else
the workdir), `best_rq@STEPS` beside them in best_rq-STEPS/, `random` (written from
`seed`, seconds) in <workdir>/bases/random, and `best_rq_keepK` (best_rq's frontend and lowest K
blocks under random's blocks above them) in <workdir>/bases/best_rq_keepK.
"""

import os

import ml_collections

from tpa_jax.config.files import load_config_file

VARIANTS = ('tiny',)


def probe_fields() -> ml_collections.ConfigDict:
  """`probe`: the bases, tasks, budget and rate grid of the layer probes."""
  p = ml_collections.ConfigDict()
  # Comma-separated bases, each a line of the plot: random, supervised, best_rq (the study's
  # BEST-RQ base), best_rq@STEPS (the same stage for STEPS steps), NAME=PATH (any encoder).
  p.bases = 'random,supervised,best_rq'
  # Tasks as study.tasks takes them: language ID (classification) and Spanish ASR (CTC).
  p.tasks = 'synthetic_speech/lang_id,synthetic_speech/target_lang'
  # Adam steps of every probe: full-batch steps for classification, one evaluation batch of
  # the train split per step for CTC.
  p.num_steps = 1000
  # Every layer trains at each rate; validation chooses one per layer.
  p.learning_rates = '1e-3,1e-2,1e-1'
  return p


def get_config(arg=None):
  if arg not in (None, '') and arg not in VARIANTS:
    raise ValueError(f'configs/probe.py takes no argument or one of {VARIANTS}, got {arg!r}')
  study = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'study.py')
  c = load_config_file(study + (':ssl_tiny' if arg == 'tiny' else ':ssl'))
  c.probe = p = probe_fields()
  if arg == 'tiny':  # seconds: the tiny corpus, model and BEST-RQ stage
    p.bases = 'random,best_rq'
    p.tasks = 'synthetic_speech/lang_id_tiny,synthetic_speech/target_lang_tiny'
    p.num_steps = 40
    p.learning_rates = '1e-2,1e-1'
  return c
