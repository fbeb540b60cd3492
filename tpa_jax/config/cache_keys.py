"""Cache keys of pre-trained bases (the demo's supervised base, a study's BEST-RQ base): a hash of
the config fields that determine the weights, so that adapting or decoding differently reuses a
cached base and anything that changes the weights does not."""

from __future__ import annotations

import hashlib
import json

import ml_collections

# The sections of a pre-training stage's config that determine the weights it trains, and the
# fields inside them that do not (how it is logged, evaluated, stored and read).
_THE_BASE = ('seed', 'model', 'adapter', 'head', 'train', 'optim', 'data', 'features',
             'tokenizer', 'mesh', 'ssl')
_NOT_THE_BASE = ('train.log_every_steps', 'train.eval_every_steps', 'train.validation_decoding',
                 'data.eval_split', 'data.validation_split', 'data.eval_batch_size',
                 'data.num_threads', 'data.data_dir', 'data.domains_file', 'tokenizer.dir',
                 # The tokenizer's own bytes are in the key: how its text was normalised, or
                 # which file it was read from, is in them.
                 'data.text_normalization', 'tokenizer.file')


def base_fields(config: ml_collections.ConfigDict) -> dict:
  """The config fields that determine the weights of the base `config` pre-trains (without
  its tokenizer's bytes and its dataset's content, which `base_cache_key` adds)."""
  c = {k: v for k, v in config.to_dict().items() if k in _THE_BASE}
  for path in _NOT_THE_BASE:
    *parents, leaf = path.split('.')
    node = c
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  if c['head'].get('kind') != 'best_rq':
    c.pop('ssl', None)  # (a study's config holds it for its BEST-RQ base only)
  if c['train']['trainable'] == 'full' and c['adapter']['placement'] == 'none':
    c.pop('adapter')  # no adapter exists to be shaped by these fields
  return c


def base_cache_key(config: ml_collections.ConfigDict, tokenizer, *,
                   dataset_description=None) -> str:
  """The cache key of a pre-trained base: what determines its weights (`base_fields`: the
  model, features, data order, steps and optimizer of its stage; its tokenizer (None for
  self-supervised pre-training; else anything with `serialize()` to bytes) and its training
  domain (`dataset_description`: `data.datasets.dataset_description`)), and nothing else, so
  adapting differently or decoding differently reuses the cached base."""
  c = base_fields(config)
  c['dataset'] = dataset_description
  if tokenizer is None:  # self-supervised pre-training reads no transcripts
    c.pop('tokenizer', None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]
  blob = json.dumps(c, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob + tokenizer.serialize()).hexdigest()[:16]
