"""BEST-RQ pre-training runs: `launch/pretrain.py`'s work, and the BEST-RQ base of a study.

A pre-training run is an ordinary training run (`tpa_jax.train.loop.train`: the sharded step
with every weight trainable, periodic and preemption checkpoints, exact resume, several
processes, metrics and TensorBoard) whose head is `best_rq`. When it completes it writes a base
in the demo's and the converters' format:

    <workdir>/base/encoder   the encoder (what `base.path` takes), metadata: the cache key, the
                             base fingerprint, the loss curve, the dataset
    <workdir>/base/head      the quantizer and prediction heads (to continue pre-training)
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from tpa_jax import config as config_lib
from tpa_jax.errors import ConfigError

# JAX and the checkpoint modules are imported inside the functions that use them: config files
# (configs/pretrain.py, configs/study.py) import this module.


def schedule_fields() -> ml_collections.ConfigDict:
  """`ssl_pretrain`: the data, steps and optimizer of a BEST-RQ pre-training stage."""
  p = ml_collections.ConfigDict()
  # Audio of this dataset (transcripts ignored): a TFDS speech dataset as data.name takes it.
  p.dataset = 'synthetic_speech/source'
  p.num_steps = 2000
  p.learning_rate = 2e-3
  p.warmup_steps = 200
  return p


def demo_fields(c: ml_collections.ConfigDict) -> None:
  """Adds the demo-size BEST-RQ stage to a config of the demo's shape (configs/pretrain.py,
  configs/study.py:ssl), on the audio of the demo's `source` domain. BEST-RQ's quantizer
  (16-dim codes, one codebook), changed from the paper's setting where measured at this size
  (README): a codebook of 256, not 8,192 (nearest-code targets of 30 ms frames are noisy: with
  1,024 codes a frame shares its neighbour's target 12% of the time, with 256 18%), and spans
  of 5 encoder frames (150 ms) starting at 6% of frames, about a quarter of the frames masked
  (with the paper's 1% starts and 300 ms spans, 2,000 steps left the loss at the targets'
  entropy: nothing learned). 3,000 steps fit the 20-minute CPU budget."""
  # Imported here: the quantizer module is JAX code; configs import this module.
  from tpa_jax.ssl import best_rq  # pylint: disable=import-outside-toplevel
  c.ssl = best_rq.ssl_fields()
  c.ssl.update(dict(codebook_size=256, code_dim=16, num_codebooks=1, mask_prob=0.06,
                    mask_span=5, noise_std=0.1))
  c.ssl_pretrain = schedule_fields()
  c.ssl_pretrain.update(dict(dataset=c.demo.source, num_steps=3000, learning_rate=1e-3,
                             warmup_steps=300))


def tiny_fields(c: ml_collections.ConfigDict) -> None:
  """The tiny stage of the tests (seconds), after `demo_fields` on the demo's tiny config: a
  small codebook, spans of 3 frames starting at 20% of frames, 12 steps. Batches of 10 and 4
  utterances (3 s and 7 s buckets) are even, so that one device and a batch split over two
  processes train on the same batches (configs/pretrain.py:tiny and configs/study.py:ssl_tiny,
  whose study finds the base the first writes)."""
  c.ssl.update(dict(codebook_size=16, code_dim=4, mask_prob=0.2, mask_span=3))
  c.ssl_pretrain.update(num_steps=12, warmup_steps=2, learning_rate=3e-3)
  c.data.batch_seconds = 30.0


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run config of BEST-RQ pre-training from a config holding `ssl` and `ssl_pretrain`
  sections beside the shared model, features and data fields (the demo's, a study's): every
  weight trains, the head is BEST-RQ's, nothing is validated or evaluated."""
  for section in ('ssl', 'ssl_pretrain'):
    if section not in config:
      raise ConfigError(f'BEST-RQ pre-training needs the config section {section!r} (as '
                        'configs/pretrain.py and configs/study.py:ssl have)')
  c = ml_collections.ConfigDict(config.to_dict())
  p = c.ssl_pretrain
  for section in ('demo', 'study', 'ssl_pretrain'):
    if section in c:
      del c[section]
  if c.data.domains_file and p.dataset.startswith('synthetic_speech/'):
    c.data.name = p.dataset  # a domain of the config's own domains file
  else:
    config_lib.apply_data(c, p.dataset)  # named errors for unknown datasets
  config_lib.apply_method(c, 'full')
  c.head.kind = 'best_rq'
  c.base.path = ''
  c.train.num_steps = int(p.num_steps)
  c.train.eval_every_steps = 0
  c.data.eval_split = ''
  c.optim.learning_rate = float(p.learning_rate)
  c.optim.warmup_steps = int(p.warmup_steps)
  return c


def cache_key(config: ml_collections.ConfigDict, dataset_description: str) -> str:
  """What determines the weights of the base pre-training `config` writes (the demo's cache
  key, with the ssl section and without a tokenizer)."""
  from tpa_jax.programs import demo  # pylint: disable=import-outside-toplevel
  return demo.fingerprint(config, None, dataset_description=dataset_description)


def _curve(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in map(json.loads, f) if r.get('stage', 'train') == 'train']


def write_base(trainer, config: ml_collections.ConfigDict, workdir: str, key: str,
               dataset: str) -> dict:
  """Writes the trained encoder (and head) to `<workdir>/base`; returns what it recorded."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tpa_jax import checkpoint  # pylint: disable=import-outside-toplevel
  model = trainer.model()
  fingerprint = checkpoint.base_fingerprint(config.model, model)
  path = os.path.join(workdir, 'base')
  checkpoint.save_state(os.path.join(path, 'head'), nnx.state(model.head))
  # The encoder is written last: its metadata marks a complete base.
  metadata = {'fingerprint': key, 'base_fingerprint': fingerprint, 'dataset': dataset,
              'pretraining': 'best_rq', 'curve': _curve(workdir)}
  checkpoint.save_state(os.path.join(path, 'encoder'), checkpoint.base_state(model),
                        metadata=metadata)
  logging.info('BEST-RQ base written to %s/encoder (fingerprint %s)', path, fingerprint['id'])
  return {'base_path': os.path.join(path, 'encoder'), 'base_fingerprint': fingerprint['id']}


def dataset_key(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The description of the pre-training dataset that the cache key holds (its TFDS name,
  version and builder config, not where it is stored)."""
  from tpa_jax.data import datasets  # pylint: disable=import-outside-toplevel
  from tpa_jax.programs import demo  # pylint: disable=import-outside-toplevel
  d = config.data
  return demo.builder_description(datasets.open_builder(
      d.name, d.data_dir or os.path.join(workdir, 'data'), d.domains_file))


def cached(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """The encoder path of the base that `config` pre-trains, if `workdir` holds it."""
  from tpa_jax import checkpoint  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.path.join(workdir, 'base', 'encoder'))
  meta = checkpoint.read_metadata(path)
  key = cache_key(config, dataset_key(config, workdir))
  return path if meta is not None and meta.get('fingerprint') == key else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pre-trains (resuming from the workdir's newest checkpoint) and writes the base; returns
  the run's results with the base's path and fingerprint."""
  from tpa_jax.train import loop  # pylint: disable=import-outside-toplevel
  if config.head.kind != 'best_rq':
    raise ConfigError(f"head.kind={config.head.kind!r}: pre-training trains head.kind='best_rq'")
  key = cache_key(config, dataset_key(config, workdir))
  return loop.train(config, workdir, finish=lambda trainer: write_base(
      trainer, config, workdir, key, config.data.name))


def ensure_base(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The encoder path of the BEST-RQ base that `pretrain_config(config)` describes: cached in
  `workdir`, else pre-trained there now (once; an interrupted pre-training resumes)."""
  import jax  # pylint: disable=import-outside-toplevel
  c = pretrain_config(config)
  path = cached(c, workdir)
  if path is not None:
    logging.info('using the cached BEST-RQ base in %s', path)
    return path
  logging.info('no cached BEST-RQ base fits; pre-training one in %s (once)', workdir)
  if jax.process_count() > 1:
    raise ConfigError('a study pre-trains its BEST-RQ base in one process; run '
                      'launch/pretrain.py on the hosts first and pass --config.base.path')
  return run(c, workdir)['base_path']
