"""The frozen base of a study: `base.path` when given; else the demo's pre-trained base, reused
from the demo's workdir when it is there, else pre-trained once and cached in the study's
workdir, exactly as the demo does (the same cache key)."""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from tpa_jax.errors import ConfigError


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the study's TFDS datasets live: `data.data_dir`, else the demo workdir's (when it
  exists: its corpus is reused), else `<workdir>/data`."""
  if config.data.data_dir:
    return config.data.data_dir
  shared = os.path.join(config.study.base_workdir, 'data')
  return os.path.abspath(shared) if config.study.base_workdir and os.path.isdir(shared) else (
      os.path.join(workdir, 'data'))


def resolve(config: ml_collections.ConfigDict, workdir: str, mesh) -> tuple[str, str]:
  """(base encoder path, data directory) of the study; pre-trains the base if it must."""
  data = data_dir(config, workdir)
  if config.base.path:
    if not os.path.exists(config.base.path):
      raise ConfigError(f'base.path={config.base.path!r} does not exist; pass a base written '
                        'by make demo, launch/convert.py or launch/pretrain.py, or leave it '
                        "'' for the demo's base")
    return config.base.path, data
  if 'demo' not in config:
    raise ConfigError("base.path='' and the config has no demo section to pre-train a base "
                      'with; pass --config.base.path')
  # Imported here: the demo pulls in the speech pipeline.
  from tpa_jax.data import datasets  # pylint: disable=import-outside-toplevel
  from tpa_jax.programs import demo  # pylint: disable=import-outside-toplevel
  from tpa_jax.audio.featurizer import output_frames  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict(config.data.to_dict())
  c.name, c.data_dir = config.demo.source, data
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
