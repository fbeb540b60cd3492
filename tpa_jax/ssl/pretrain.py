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

import jax
import ml_collections
from absl import logging
from flax import nnx

from tpa_jax import checkpoint
from tpa_jax.config import cache_keys
from tpa_jax.config.ssl import pretrain_config
from tpa_jax.data import datasets
from tpa_jax.errors import ConfigError
from tpa_jax.train import loop

# The config sections (ssl, ssl_pretrain) and the run config of a pre-training run are in
# tpa_jax/config/ssl.py: config files compose them without importing JAX.


def cache_key(config: ml_collections.ConfigDict, dataset_description: str) -> str:
  """What determines the weights of the base pre-training `config` writes (the demo's cache
  key, with the ssl section and without a tokenizer)."""
  return cache_keys.base_cache_key(config, None, dataset_description=dataset_description)


def _curve(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in map(json.loads, f) if r.get('stage', 'train') == 'train']


def write_base(trainer, config: ml_collections.ConfigDict, workdir: str, key: str,
               dataset: str) -> dict:
  """Writes the trained encoder (and head) to `<workdir>/base`; returns what it recorded."""
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
  d = config.data
  return datasets.builder_description(datasets.open_builder(
      d.name, d.data_dir or os.path.join(workdir, 'data'), d.domains_file))


def cached(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """The encoder path of the base that `config` pre-trains, if `workdir` holds it."""
  path = os.path.abspath(os.path.join(workdir, 'base', 'encoder'))
  meta = checkpoint.read_metadata(path)
  key = cache_key(config, dataset_key(config, workdir))
  return path if meta is not None and meta.get('fingerprint') == key else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pre-trains (resuming from the workdir's newest checkpoint) and writes the base; returns
  the run's results with the base's path and fingerprint."""
  if config.head.kind != 'best_rq':
    raise ConfigError(f"head.kind={config.head.kind!r}: pre-training trains head.kind='best_rq'")
  key = cache_key(config, dataset_key(config, workdir))
  return loop.train(config, workdir, finish=lambda trainer: write_base(
      trainer, config, workdir, key, config.data.name))


def _leaves(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_leaves(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def refuse_another_run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a cache folder holding checkpoints of another config's pre-training (a study's
  shared base_workdir, after a change of `ssl` or `ssl_pretrain`): resuming them would train
  neither base. The error names the fields that determine the weights and differ."""
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return
  reader = checkpoint.RunCheckpointer(folder, read_only=True)
  try:
    if not reader.committed_steps():
      return
    saved = ml_collections.ConfigDict(reader.newest_run_info()['config'])
  finally:
    reader.close()
  fields = lambda c: _leaves(json.loads(json.dumps(cache_keys.base_fields(c), default=str)))
  there, here = fields(saved), fields(config)
  differ = sorted(k for k in there.keys() | here.keys() if there.get(k) != here.get(k))
  if differ:
    shown = '; '.join(f'{k}: {there.get(k)!r} there, {here.get(k)!r} here' for k in differ)
    raise ConfigError(f'{workdir} holds the checkpoints of another BEST-RQ pre-training '
                      f'({shown}), which this one would resume: choose another folder (a '
                      'study: --config.study.base_workdir) or remove that one')


def ensure_base(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The encoder path of the BEST-RQ base that `pretrain_config(config)` describes: cached in
  `workdir`, else pre-trained there now (once; an interrupted pre-training resumes)."""
  c = pretrain_config(config)
  path = cached(c, workdir)
  if path is not None:
    logging.info('using the cached BEST-RQ base in %s', path)
    return path
  refuse_another_run(c, workdir)
  logging.info('no cached BEST-RQ base fits; pre-training one in %s (once)', workdir)
  # The cache's folder is the caller's choice (a study's shared base_workdir, which a fresh
  # checkout lacks): made here, unlike a run's --workdir, whose parent must exist.
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  if jax.process_count() > 1:
    raise ConfigError('a study pre-trains its BEST-RQ base in one process; run '
                      'launch/pretrain.py on the hosts first and pass --config.base.path')
  return run(c, workdir)['base_path']
