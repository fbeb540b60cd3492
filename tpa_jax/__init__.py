"""tpa_jax: Two Parallel Adapters and residual adapters for frozen conformer speech encoders.

Where things live:
  nn/          Flax NNX modules (frontends, attention, conv, blocks, encoder, adapters, heads)
               and `nn.build`, the one place a config becomes modules
  audio/       features computed on device: log-mel, imported front ends, SpecAugment
  data/        the synthetic speech corpus, TFDS datasets, the input pipeline, tokenizers,
               the random task of tests and smoke runs
  train/       what trains (partition), optimizer, losses, the step, the trainer, the loop,
               preemption, metrics
  checkpoint/  bases, run checkpoints, fingerprints, adapter specs
  infer/       decoding, scoring, evaluation, encoding, exports, the standalone serving loader
  convert/     importers of public checkpoints (w2v-BERT 2.0, FastConformer)
  plan/        the memory planner and cost counts
  config/      every config field, presets and methods, config files and overrides
  programs/    what the programs in launch/ share (errors, flags, distributed set-up) and the
               demo
  sharding.py  the logical-axis rule table and meshes; errors.py  errors a user can fix
"""

__version__ = '0.1.0'
