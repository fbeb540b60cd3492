"""The frozen base of a study: `base.path` when given; else, by `study.base`, the demo's
pre-trained base (reused from the demo's workdir when it is there, else pre-trained once and
cached in the study's workdir, exactly as the demo does: the same cache key), a BEST-RQ base
(pre-trained once from the config's ssl sections and cached), or the architecture at its random
initialisation."""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from tpa_jax import checkpoint
from tpa_jax.audio.featurizer import output_frames
from tpa_jax.data import datasets
from tpa_jax.errors import ConfigError
from tpa_jax.nn import build
from tpa_jax.programs import demo
from tpa_jax.ssl import pretrain


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the study's TFDS datasets live: `data.data_dir`, else the demo workdir's (when it
  exists: its corpus is reused), else `<workdir>/data`."""
  if config.data.data_dir:
    return config.data.data_dir
  shared = os.path.join(config.study.base_workdir, 'data')
  return os.path.abspath(shared) if config.study.base_workdir and os.path.isdir(shared) else (
      os.path.join(workdir, 'data'))


BASES = ('supervised', 'best_rq', 'random')


def check(config: ml_collections.ConfigDict) -> None:
  """Named errors for study.base and study.bases, before anything runs."""
  s = config.study
  for name in [s.base] + [b.strip() for b in s.bases.split(',') if b.strip()]:
    if name not in BASES:
      raise ConfigError(f'study.base(s) names {name!r}: accepted bases are {BASES}')
    if name == 'best_rq' and ('ssl' not in config or 'ssl_pretrain' not in config):
      raise ConfigError("study base 'best_rq' needs the ssl and ssl_pretrain sections of "
                        'BEST-RQ pre-training: use configs/study.py:ssl or :best_rq')


def resolve(config: ml_collections.ConfigDict, workdir: str, mesh) -> tuple[str, str]:
  """(base encoder path, data directory) of the study; pre-trains the base if it must."""
  data = data_dir(config, workdir)
  if config.base.path:
    if not os.path.exists(config.base.path):
      raise ConfigError(f'base.path={config.base.path!r} does not exist; pass a base written '
                        'by make demo, launch/convert.py or launch/pretrain.py, or leave it '
                        "'' for the demo's base")
    return config.base.path, data
  check(config)
  if config.study.base == 'best_rq':
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.data_dir = data
    return pretrain.ensure_base(c, os.path.join(config.study.base_workdir or workdir,
                                                'best_rq')), data
  if config.study.base == 'random':
    return random_base(config, os.path.join(workdir, 'base'), mesh), data
  if 'demo' not in config:
    raise ConfigError("base.path='' and the config has no demo section to pre-train a base "
                      'with; pass --config.base.path')
  c = ml_collections.ConfigDict(config.data.to_dict())
  c.name, c.data_dir = config.demo.source, data
  # The base learns its corpus's own text (the tasks' normalisation is theirs), so a study with
  # normalised tasks shares the demo's base.
  c.text_normalization = 'none'
  source = datasets.SpeechData.open(c, workdir=workdir, task='ctc', frames=output_frames(config),
                                    data_ways=mesh.shape['data'] * mesh.shape['fsdp'])
  source.prepare()
  tokenizer = source.tokenizer(config.tokenizer, os.path.join(workdir, 'tokenizers'))
  if config.study.base_workdir:
    shared = os.path.join(config.study.base_workdir, 'base')
    if demo.cached_base(config, shared, source, tokenizer) is not None:
      logging.info("using the demo's cached base in %s", shared)
      return os.path.abspath(os.path.join(shared, 'encoder')), data
  own = os.path.join(workdir, 'base')
  if demo.cached_base(config, own, source, tokenizer) is None:
    logging.info('no cached base fits this study; pre-training one into %s (once)', own)
  demo.pretrained_base(config, own, mesh, source, tokenizer)
  return os.path.join(own, 'encoder'), data


def random_base(config: ml_collections.ConfigDict, path: str, mesh) -> str:
  """The encoder of the study's architecture at its random initialisation (`config.seed`),
  written once to `path`/encoder: the floor a pre-trained base must beat."""
  encoder = os.path.join(path, 'encoder')
  key = {'random_init': config.model.to_dict(), 'seed': int(config.seed)}
  meta = checkpoint.read_metadata(encoder)
  if meta is not None and meta.get('fingerprint') == key:
    return encoder
  c = ml_collections.ConfigDict(config.to_dict())
  c.adapter.placement = 'none'
  model = build.create_model(c, mesh)
  checkpoint.save_state(encoder, checkpoint.base_state(model),
                        metadata={'fingerprint': key, 'random_init': True})
  logging.info('a randomly initialised base (seed %d) written to %s', config.seed, encoder)
  return encoder
