"""The frozen base of a study: `base.path` when given; else, by `study.base`, the demo's
pre-trained base (reused from the demo's workdir when it is there, else pre-trained once and
cached in the study's workdir, exactly as the demo does: the same cache key), a BEST-RQ base
(pre-trained once from the config's ssl sections and cached), or the architecture at its random
initialisation."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from tpa_jax import checkpoint
from tpa_jax.audio.featurizer import output_frames
from tpa_jax.data import datasets
from tpa_jax.errors import ConfigError
from tpa_jax.nn import build
from tpa_jax.programs import demo
from tpa_jax.ssl import pretrain
from tpa_jax.train import trainer as trainer_lib


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the study's TFDS datasets live: `data.data_dir`, else the demo workdir's (when it
  exists: its corpus is reused), else `<workdir>/data`."""
  if config.data.data_dir:
    return config.data.data_dir
  shared = os.path.join(config.study.base_workdir, 'data')
  return os.path.abspath(shared) if config.study.base_workdir and os.path.isdir(shared) else (
      os.path.join(workdir, 'data'))


_NAMED = ('supervised', 'best_rq', 'random')
BASES = (*_NAMED, 'best_rq_keepK')
# best_rq_keepK: the BEST-RQ base's frontend and lowest K blocks, under the random base's
# blocks above them (the layer probes find what adapters need in BEST-RQ's lower blocks only).
_KEEP = re.compile(r'best_rq_keep(\d+)')


def kept_blocks(name: str) -> int | None:
  """K of a 'best_rq_keepK' base name, else None."""
  match = _KEEP.fullmatch(name)
  return int(match.group(1)) if match else None


def is_base(name: str) -> bool:
  return name in _NAMED or kept_blocks(name) is not None


def check(config: ml_collections.ConfigDict) -> None:
  """Named errors for study.base and study.bases, before anything runs."""
  s = config.study
  for name in [s.base] + [b.strip() for b in s.bases.split(',') if b.strip()]:
    if not is_base(name):
      raise ConfigError(f'study.base(s) names {name!r}: accepted bases are {BASES}')
    keep = kept_blocks(name)
    if keep is not None and not 0 < keep < config.model.num_blocks:
      raise ConfigError(f'study base {name!r}: K must be 1 .. {config.model.num_blocks - 1} '
                        f'(model.num_blocks={config.model.num_blocks})')
    if name.startswith('best_rq') and ('ssl' not in config or 'ssl_pretrain' not in config):
      raise ConfigError(f'study base {name!r} needs the ssl and ssl_pretrain sections of '
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
  keep = kept_blocks(config.study.base)
  if keep is not None:
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.data_dir = data
    lower = pretrain.ensure_base(c, os.path.join(config.study.base_workdir or workdir, 'best_rq'))
    upper = random_base(config, os.path.join(workdir, 'random'), mesh)
    return kept_base(config, lower, upper, keep, os.path.join(workdir, 'base'), mesh), data
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


def kept_base(config: ml_collections.ConfigDict, lower: str, upper: str, keep: int, path: str,
              mesh) -> str:
  """A base of the frontend and lowest `keep` blocks of the encoder at `lower`, and the blocks
  above them (and anything after the blocks) of the encoder at `upper`, written once to
  `path`/encoder and named by both bases' fingerprints."""
  encoder = os.path.join(path, 'encoder')
  fingerprint = lambda p: (checkpoint.read_metadata(p) or {}).get('fingerprint')
  key = {'lower': fingerprint(lower), 'upper': fingerprint(upper), 'keep_blocks': keep}
  meta = checkpoint.read_metadata(encoder)
  if meta is not None and meta.get('fingerprint') == key:
    return encoder
  c = ml_collections.ConfigDict(config.to_dict())
  c.adapter.placement = 'none'
  # Shapes and shardings only: both bases are read into them, nothing is initialised.
  target = checkpoint.base_state(trainer_lib.abstract_model(c, mesh))
  with jax.set_mesh(mesh):
    low = checkpoint.restore_state(lower, target, stored_dtype=True)
    high = checkpoint.restore_state(upper, target, stored_dtype=True)

  def pick(key_path, a, b):
    part = key_path[0].key
    if part == 'frontend':
      return a
    if part != 'blocks':
      return b
    if a.shape[0] != config.model.num_blocks:
      raise ConfigError(f'{jax.tree_util.keystr(key_path)}: expected {config.model.num_blocks} '
                        f'stacked blocks, found shape {a.shape}')
    return jnp.concatenate([a[:keep], b[keep:].astype(a.dtype)])

  with jax.set_mesh(mesh):
    mixed = jax.tree_util.tree_map_with_path(pick, low, high)
  checkpoint.save_state(encoder, mixed, metadata={'fingerprint': key, 'lower': lower,
                                                  'upper': upper})
  logging.info('blocks 1-%d of %s under blocks %d-%d of %s written to %s', keep, lower,
               keep + 1, config.model.num_blocks, upper, encoder)
  return encoder
