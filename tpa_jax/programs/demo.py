"""The demo: pre-train a conformer on English, watch it fail on a new language, recover with TPA.

Stages (each timed; `results.json`, `learning_curves.png` and the adapters land in the workdir):

  prepare     synthesise the `source` and target corpora (TFDS, array_record), once
  tokenizers  character vocabularies of each training split, cached
  pretrain    train the whole model on `source` (cached: a second run restores the base)
  evaluate    WER of the base on `source` and on the target
  adapt       freeze the base; train TPA adapters + a new head on the target
  evaluate    WER of the adapted model on the target; save the adapters
"""

from __future__ import annotations

import json
import os
import shutil
import time

import ml_collections
from absl import logging
from flax import nnx

from tpa_jax import checkpoint, sharding
from tpa_jax import config as config_lib
from tpa_jax.config import cache_keys
from tpa_jax.audio.featurizer import featurizer, output_frames
from tpa_jax.data import datasets
from tpa_jax.eval import decoding, scoring
from tpa_jax.nn import build
from tpa_jax.train import loop as training
from tpa_jax.train import trainer as trainer_lib
from tpa_jax.train.metrics import MetricsWriter


def stage_config(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict, *,
                 dataset: str, vocab_size: int) -> ml_collections.ConfigDict:
  """The run config of one training stage: the shared model/features/data fields, the stage's
  method, steps and optimizer, and the dataset's vocabulary."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.name = dataset
  c.head.vocab_size = vocab_size
  config_lib.apply_method(c, stage.method)
  if 'bottleneck' in stage:
    c.adapter.bottleneck = stage.bottleneck
  c.train.num_steps = stage.num_steps
  c.optim.learning_rate = stage.learning_rate
  c.optim.warmup_steps = stage.warmup_steps
  return c


def cached_base(config: ml_collections.ConfigDict, path: str, source: datasets.SpeechData,
                source_tok) -> dict | None:
  """The metadata of the base pre-trained by `config.demo.pretrain` if `path` holds it (its
  key matches), else None."""
  base_config = stage_config(config, config.demo.pretrain, dataset=config.demo.source,
                             vocab_size=source_tok.vocab_size)
  key = cache_keys.base_cache_key(base_config, source_tok,
                                  dataset_description=datasets.dataset_description(source))
  meta = checkpoint.read_metadata(os.path.join(path, 'encoder'))
  return meta if meta is not None and meta.get('fingerprint') == key else None


def pretrained_base(config: ml_collections.ConfigDict, path: str, mesh, source, source_tok,
                    writer: MetricsWriter | None = None):
  """(model, learning curve, pre-trained now?) of the base that `config.demo.pretrain` trains
  on `source`: restored from `path` when it holds that base (its cache key matches), else
  trained and saved there (`path`/encoder, `path`/head)."""
  demo = config.demo
  base_config = stage_config(config, demo.pretrain, dataset=demo.source,
                             vocab_size=source_tok.vocab_size)
  key = cache_keys.base_cache_key(base_config, source_tok,
                                  dataset_description=datasets.dataset_description(source))
  meta = cached_base(config, path, source, source_tok)
  base = build.create_model(base_config, mesh)
  if meta is not None:
    logging.info('restoring the pre-trained base from %s (delete it to pre-train again)', path)
    checkpoint.load_base(os.path.join(path, 'encoder'), base)
    nnx.update(base.head, checkpoint.restore_state(os.path.join(path, 'head'),
                                                    nnx.state(base.head)))
    return base, meta['curve'], False
  trainer = trainer_lib.from_config(base_config, mesh, model=base)
  training.describe(trainer)
  loader = source.train_loader(source_tok, seed=config.seed, num_batches=demo.pretrain.num_steps)
  curve = training.fit(trainer, iter(loader), num_steps=demo.pretrain.num_steps, writer=writer,
                       log_every=config.train.log_every_steps, stage='pretrain')
  base = trainer.model()
  checkpoint.save_state(os.path.join(path, 'head'), nnx.state(base.head))
  # The encoder is written last: its metadata marks a complete base.
  checkpoint.save_state(os.path.join(path, 'encoder'), checkpoint.base_state(base),
                         metadata={'fingerprint': key, 'curve': curve, 'dataset': demo.source})
  return base, curve, True


class Clock:
  """Wall seconds per stage."""

  def __init__(self):
    self.start = time.perf_counter()
    self.seconds: dict[str, float] = {}
    self._stage_start = self.start

  def lap(self, stage: str) -> None:
    now = time.perf_counter()
    self.seconds[stage] = round(now - self._stage_start, 1)
    self._stage_start = now

  def total(self) -> dict[str, float]:
    return {**self.seconds, 'total': round(time.perf_counter() - self.start, 1)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the demo; returns (and writes to `workdir/results.json`) its results."""
  os.makedirs(workdir, exist_ok=True)
  clock = Clock()
  mesh = sharding.make_mesh(**config.mesh)
  data_ways = mesh.shape['data'] * mesh.shape['fsdp']
  frames = output_frames(config)
  demo = config.demo

  # -- prepare -----------------------------------------------------------------------------
  def open_data(name):
    c = ml_collections.ConfigDict(config.data.to_dict())
    c.name = name
    return datasets.SpeechData.open(c, workdir=workdir, task='ctc', frames=frames,
                                    data_ways=data_ways)
  source, target = open_data(demo.source), open_data(demo.target)
  for data in (source, target):
    logging.info('preparing %s (synthesised once, then read from disk)',
                 data.builder.info.full_name)
    data.prepare()
  clock.lap('prepare')

  token_dir = os.path.join(workdir, 'tokenizers')
  source_tok = source.tokenizer(config.tokenizer, token_dir)
  target_tok = target.tokenizer(config.tokenizer, token_dir)
  clock.lap('tokenizers')
  writer = MetricsWriter(workdir)

  # -- pretrain (or restore the cached base) -------------------------------------------------
  base_path = os.path.join(workdir, 'base')
  base, pretrain_curve, pretrained_now = pretrained_base(config, base_path, mesh, source,
                                                         source_tok, writer)
  clock.lap('pretrain')

  # -- the base on source and target ---------------------------------------------------------
  evaluator = scoring.Evaluator('ctc', featurizer(config), mesh)
  split = config.data.eval_split
  train_split = config.data.train_split

  def decoder(data, tokenizer):  # the lexicon and word LM of the evaluated domain
    return decoding.make_decoder(config.decoding, tokenizer,
                                 lambda: data.texts(train_split))

  source_eval = evaluator.evaluate(base, source.eval_batches(split, source_tok), source_tok,
                                   decoder=decoder(source, source_tok))
  before = evaluator.evaluate(base, target.eval_batches(split, source_tok), source_tok,
                              decoder=decoder(target, source_tok))
  logging.info('base: source WER %.3f, target WER %.3f', source_eval['wer'], before['wer'])
  clock.lap('evaluate_base')

  # -- adapt: frozen base, TPA adapters + a new head on the target ---------------------------
  adapt_config = stage_config(config, demo.adapt, dataset=demo.target,
                              vocab_size=target_tok.vocab_size)
  adapt_config.base.path = os.path.join(base_path, 'encoder')
  # The run checkpoint names the demo's corpus and tokenizers, so that launch/export.py and
  # launch/evaluate.py on <workdir>/adapt read them instead of preparing their own.
  adapt_config.data.data_dir = os.path.abspath(config.data.data_dir or
                                               os.path.join(workdir, 'data'))
  adapt_config.tokenizer.dir = os.path.abspath(token_dir)
  trainer = trainer_lib.from_config(adapt_config, mesh)
  info = training.describe(trainer)
  loader = iter(target.train_loader(target_tok, seed=config.seed,
                                    num_batches=demo.adapt.num_steps))
  adapt_curve = training.fit(trainer, loader, num_steps=demo.adapt.num_steps,
                             writer=writer, log_every=config.train.log_every_steps,
                             stage='adapt')
  # A run checkpoint like launch/train.py's: `launch/export.py --workdir=<workdir>/adapt`.
  adapt_dir = os.path.join(workdir, 'adapt', 'checkpoints')
  shutil.rmtree(adapt_dir, ignore_errors=True)  # this run's adaptation replaces the last one
  run_checkpoints = checkpoint.RunCheckpointer(adapt_dir, keep=1, async_save=False)
  run_checkpoints.save(demo.adapt.num_steps, trainer.state, data_state=loader.get_state(),
                       run_info=checkpoint.run_info(adapt_config, trainer.base_fingerprint))
  run_checkpoints.close()
  clock.lap('adapt')

  after = evaluator.evaluate(trainer.model(), target.eval_batches(split, target_tok), target_tok,
                             decoder=decoder(target, target_tok))
  clock.lap('evaluate_adapted')

  results = {
      'source_wer': source_eval['wer'], 'source_cer': source_eval['cer'],
      'target_wer_before': before['wer'], 'target_cer_before': before['cer'],
      'target_wer_after': after['wer'], 'target_cer_after': after['cer'],
      'relative_wer_reduction': 1.0 - after['wer'] / max(before['wer'], 1e-9),
      'decoding': config.decoding.kind,
      # Best-path decoding of the same outputs, for comparison (equal when decoding is greedy).
      'greedy': {name: {'wer': r.get('greedy_wer', r['wer']), 'cer': r.get('greedy_cer', r['cer'])}
                 for name, r in (('source', source_eval), ('target_before', before),
                                 ('target_after', after))},
      **info,
      'pretrained_now': pretrained_now,
      'seconds': clock.total(),
      'examples': {'source': source_eval['examples'], 'target_before': before['examples'],
                   'target_after': after['examples']},
      'num_test_utterances': {'source': source_eval['num_utterances'],
                              'target': after['num_utterances']},
      'skipped_examples': {'source': source.skipped, 'target': target.skipped},
      'curves': {'pretrain': pretrain_curve, 'adapt': adapt_curve},
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  plot_curves(results['curves'], os.path.join(workdir, 'learning_curves.png'))
  print(table(results, demo))
  return results


def table(results: dict, demo) -> str:
  s, greedy = results['seconds'], results['greedy']

  def wer(name, key):
    text = f"WER {100 * results[key]:5.1f}%"
    if results['decoding'] != 'greedy':
      text += f"   (best path {100 * greedy[name]['wer']:5.1f}%)"
    return text

  rows = [
      ('decoding', results['decoding']),
      ('base on source (English) test', wer('source', 'source_wer')),
      ('base on target test', wer('target_before', 'target_wer_before')),
      (f'{demo.adapt.method} on target test', wer('target_after', 'target_wer_after')),
      ('relative WER reduction', f"{100 * results['relative_wer_reduction']:5.1f}%"),
      ('trainable parameters', f"{results['trainable_params']:,} of {results['total_params']:,}"
                               f" ({100 * results['trainable_fraction']:.2f}%)"),
  ]
  rows += [(f'time: {k}', f'{v:7.1f} s') for k, v in s.items()]
  width = max(len(r[0]) for r in rows)
  return '\n'.join(['', 'tpa_jax demo', '-' * (width + 36)] +
                    [f'{a:<{width}}  {b}' for a, b in rows] + [''])


def plot_curves(curves: dict, path: str) -> None:
  """Training loss per step of each stage, side by side."""
  # Imported here: matplotlib loads in about a second, and only the plots need it.
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
  for ax, (name, curve) in zip(axes, curves.items()):
    ax.plot([p['step'] for p in curve], [p['loss'] for p in curve])
    ax.set(title=f'{name}: CTC loss per token', xlabel='step', yscale='log')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
