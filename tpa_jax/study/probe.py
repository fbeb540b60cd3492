"""Layer probes of frozen bases: where each base keeps what the tasks need (`launch/probe.py`).

For each base of `probe.bases` and each task of `probe.tasks`, the frozen encoder runs once over
the task's train, validation and test splits; the frontend's output (layer 0) and every block's
output (layers 1 .. N, before the final norm) are kept, and a linear probe per layer reads them
(`tpa_jax.eval.probes`): a classifier on the mean of the frames for classification tasks
(language ID), a CTC projection of the frames for ASR. Every layer of every base has the same
budget (`probe.num_steps`) and rate grid (`probe.learning_rates`); validation chooses each
layer's rate and test is scored once at it. The fields are configs/probe.py's.

Bases are named as a study names them, and more:
  random            the architecture at its random initialisation (the floor)
  supervised        the demo's base (CTC on `source`), cached where the study caches it
  best_rq           the BEST-RQ base of the config's ssl sections, cached where the study's is
  best_rq@STEPS     the same pre-training run for STEPS steps (its own cache)
  NAME=PATH         any base encoder on disk

Writes `<workdir>/probe.json`, `probe.md` (a table per task: one row per base, one column per
layer) and `probe.png` (score against layer, one line per base, a panel per task). A probe's
result is cached under `<workdir>/probes/` by its base's fingerprint and the probe settings, so
adding a base probes only the new one.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from tpa_jax import checkpoint, sharding
from tpa_jax.audio.featurizer import featurizer as make_featurizer
from tpa_jax.data import datasets
from tpa_jax.data.batches import batch_inputs
from tpa_jax.errors import ConfigError
from tpa_jax.eval import probes
from tpa_jax.ssl import pretrain
from tpa_jax.study import base as base_lib
from tpa_jax.study import cells as cells_lib
from tpa_jax.train import trainer as trainer_lib
from tpa_jax.train.metrics import write_json

BASE_FORMS = ('random', 'supervised', 'best_rq', 'best_rq@STEPS', 'best_rq_keepK', 'NAME=PATH')



def parse_bases(value: str) -> list[tuple[str, str]]:
  """'random,best_rq@1500,mine=runs/x/base/encoder' -> [(name, path or '')]; named errors."""
  out = []
  for entry in cells_lib.split_list(value):
    name, sep, path = entry.partition('=')
    name = name.strip()
    if sep:
      if not name or not path.strip():
        raise ConfigError(f'probe.bases entry {entry!r}: NAME=PATH needs both')
    elif name.startswith('best_rq@'):
      steps = name[len('best_rq@'):]
      if not steps.isdigit() or int(steps) < 1:
        raise ConfigError(f'probe.bases entry {entry!r}: best_rq@STEPS takes a positive '
                          'number of pre-training steps')
    elif not base_lib.is_base(name):
      raise ConfigError(f'probe.bases entry {entry!r}: accepted forms are {BASE_FORMS}')
    if name in [n for n, _ in out]:
      raise ConfigError(f'probe.bases names {name!r} twice')
    out.append((name, path.strip()))
  if not out:
    raise ConfigError(f'probe.bases names no base; accepted forms are {BASE_FORMS}')
  return out


def resolve_base(config: ml_collections.ConfigDict, name: str, path: str, workdir: str,
                 mesh) -> str:
  """The encoder path of base `name` (pre-training or writing it once if it must)."""
  if path:
    if not os.path.exists(path):
      raise ConfigError(f'probe.bases: {name}={path} does not exist; pass a base encoder '
                        '(launch/pretrain.py, launch/convert.py or the demo writes one)')
    return path
  if name == 'random':
    return base_lib.random_base(config, os.path.join(workdir, 'bases', 'random'), mesh)
  if name.startswith('best_rq@'):
    c = ml_collections.ConfigDict(config.to_dict())
    c.ssl_pretrain.num_steps = int(name[len('best_rq@'):])
    c.data.data_dir = base_lib.data_dir(config, workdir)
    folder = os.path.join(config.study.base_workdir or workdir, name.replace('@', '-'))
    return pretrain.ensure_base(c, folder)
  keep = base_lib.kept_blocks(name)
  if keep is not None:  # over the probe's own random base, beside it in bases/
    lower = resolve_base(config, 'best_rq', '', workdir, mesh)
    upper = resolve_base(config, 'random', '', workdir, mesh)
    return base_lib.kept_base(config, lower, upper, keep, os.path.join(workdir, 'bases', name),
                              mesh)
  c = ml_collections.ConfigDict(config.to_dict())
  c.study.base, c.base.path = name, ''
  return base_lib.resolve(c, workdir, mesh)[0]


def task_config(config: ml_collections.ConfigDict, task: cells_lib.Task, base_path: str,
                workdir: str) -> ml_collections.ConfigDict:
  """The run config a probe reads the task's data and the base with: the study's config of
  the task with a head only (no adapters)."""
  return cells_lib.run_config(
      config, cells_lib.Cell(task, 'head', 1e-3, 0), base_path=base_path,
      data_dir=base_lib.data_dir(config, workdir),
      tokenizer_dir=os.path.join(workdir, 'tokenizers'))


def _layers_fn(model, featurizer, mesh):
  """batch -> (hidden states [N + 1, B, T, D] float32, mask [B, T]), one jitted program."""
  graphdef, state = nnx.split(model.encoder)

  @jax.jit
  def run(state, batch):
    with sharding.axis_rules(sharding.DEFAULT_RULES):
      encoder = nnx.merge(graphdef, state)
      features, mask = batch_inputs(batch, featurizer)
      layers, mask = encoder.hidden_states(features, mask)
    return jnp.stack(layers).astype(jnp.float32), mask

  def call(batch):
    with jax.set_mesh(mesh):
      return jax.device_get(run(state, batch))
  return call


def extract(config: ml_collections.ConfigDict, run, data, tokenizer, split: str,
            scale: probes.Standardizer | None = None):
  """Every layer's output over `split` (`run`: a `_layers_fn`): utterance vectors [n, L, D] and
  labels (classification), or a list of `probes.CTCBatch` (CTC). Also, for the train split,
  the standardisation's inputs: sums, squares, count (None for the others). The train split holds the examples a training run reads (for
  CTC, labels that fit their frames, none cut); the others every usable example. CTC frames
  are kept in float32, or standardised by `scale` and stored in float16 (half the memory, and
  no overflow of large raw activations)."""
  ctc = config.head.kind == 'ctc'
  vectors, labels, batches = [], [], []
  sums = squares = None
  count, seen = 0.0, 0
  train = split == config.data.train_split
  for batch, refs in data.eval_batches(split, tokenizer, as_trained=train):
    n = int(batch['weight'].sum())
    arrays = {k: v for k, v in batch.items() if k != 'weight'}
    hidden, mask = run(arrays)
    hidden, mask = np.asarray(hidden)[:, :n], np.asarray(mask)[:n].astype(bool)
    if ctc:
      rows = hidden[:, mask]  # [L, frames, D]
      batches.append(probes.CTCBatch(
          scale(hidden, axis=0).astype(np.float16) if scale is not None else hidden, mask,
          np.asarray(batch['labels'][:n]), np.asarray(batch['label_mask'][:n], bool),
          list(refs[:n])))
    else:
      w = mask.astype(np.float32)
      pooled = np.einsum('lbtd,bt->bld', hidden, w) / np.maximum(w.sum(-1), 1.0)[:, None, None]
      rows = pooled.transpose(1, 0, 2)  # [L, n, D]
      vectors.append(pooled)
      labels.append(np.asarray(batch['labels'][:n]))
    if train:  # the standardisation's statistics, of the train split only
      r = rows.astype(np.float64)
      sums = r.sum(1) if sums is None else sums + r.sum(1)
      squares = (r ** 2).sum(1) if squares is None else squares + (r ** 2).sum(1)
      count += r.shape[1]
    seen += n
  if not seen:
    raise ConfigError(f'probe: split {split!r} of {config.data.name} has no usable utterance'
                      + (' whose transcript fits its frames' if ctc and train else '')
                      + '; pass a task whose train, validation and test splits hold some')
  stats = (sums, squares, count) if train else None
  if ctc:
    return batches, stats
  return (np.concatenate(vectors), np.concatenate(labels)), stats


def probe_task(config: ml_collections.ConfigDict, model, data, tokenizer, mesh) -> dict:
  """Trains and scores every layer's probe of `model` (loaded from the base of `config`, a
  `task_config`) on its task; returns {'layers': [...], 'metric', 'final_loss'}."""
  run = _layers_fn(model, make_featurizer(config), mesh)  # one program for the three splits
  p = config.probe
  rates = _rates(p)
  layers = model.encoder.num_blocks + 1
  splits = (config.data.train_split, config.data.validation_split, 'test')
  train, stats = extract(config, run, data, tokenizer, splits[0])
  scale = probes.Standardizer.fit(*stats)
  if config.head.kind == 'ctc':
    for b in train:
      b.frames = scale(b.frames, axis=0).astype(np.float16)
    validation, _ = extract(config, run, data, tokenizer, splits[1], scale)
    test, _ = extract(config, run, data, tokenizer, splits[2], scale)
    probe = probes.CTCProbe(layers, config.model.dim, tokenizer.vocab_size, rates)
    curve = probe.fit(train, int(p.num_steps), seed=int(config.seed))
    scores = probe.scores(validation, test, tokenizer)
    metric = 'cer'
  else:
    validation, _ = extract(config, run, data, tokenizer, splits[1])
    test, _ = extract(config, run, data, tokenizer, splits[2])
    normed = [(scale(x, axis=1), y) for x, y in (train, validation, test)]
    probe = probes.ClassificationProbe(layers, config.model.dim, data.num_classes, rates)
    curve = probe.fit(*normed[0], int(p.num_steps))
    scores = probe.scores(normed[1], normed[2])
    metric = 'accuracy'
  return {'metric': metric, 'layers': scores, 'final_loss': curve[-1] if curve else None}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Probes every base of `config.probe.bases` on every task of `config.probe.tasks`; writes
  probe.json, probe.md and probe.png into `workdir` and returns what probe.json holds."""
  workdir = checkpoint.check_workdir(workdir)
  bases = parse_bases(config.probe.bases)
  c = ml_collections.ConfigDict(config.to_dict())
  c.study.tasks = config.probe.tasks
  try:
    tasks = cells_lib.parse_tasks(c)
  except ConfigError as e:
    raise ConfigError(f'probe.tasks={config.probe.tasks!r}: {e}') from e
  rates = _rates(config.probe)
  if not str(config.probe.num_steps).isdigit() or int(config.probe.num_steps) < 1:
    raise ConfigError(f'probe.num_steps={config.probe.num_steps!r}: a positive integer')
  # Bases are pre-trained or written on the config's mesh, as a study's are; probes compile
  # small programs, and one device holds the frozen base (it is run, not trained).
  base_mesh = sharding.make_mesh(**config.mesh)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  paths = {name: resolve_base(c, name, path, workdir, base_mesh) for name, path in bases}
  results = {'bases': paths, 'learning_rates': rates, 'num_steps': int(config.probe.num_steps),
             'tasks': {}}
  for task in tasks:
    results['tasks'][task.short] = {}
    for name, path in paths.items():
      tc = task_config(c, task, path, workdir)
      tc.probe = ml_collections.ConfigDict(config.probe.to_dict())
      data, tokenizer = datasets.open_for_config(tc, workdir, mesh)
      model = trainer_lib.load_model(tc, mesh)
      fingerprint = checkpoint.base_fingerprint(tc.model, model)['id']
      key = cache_key(tc, task, fingerprint, rates, tokenizer,
                      datasets.dataset_description(data))
      cache = os.path.join(workdir, 'probes', task.short, f'{name}.json')
      cached = _read(cache)
      if cached is not None and cached.get('key') == key:
        logging.info('probe %s / %s: cached in %s', task.short, name, cache)
        out = cached['result']
      else:
        logging.info('probing %s on %s (%s), %d layers x %d rates', name, task.short, path,
                     tc.model.num_blocks + 1, len(rates))
        out = probe_task(tc, model, data, tokenizer, mesh)
        out['base_fingerprint'] = fingerprint
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        write_json(cache, {'key': key, 'result': out})
      results['tasks'][task.short][name] = out
      logging.info('probe %s / %s: %s', task.short, name,
                   ', '.join(f'{r["layer"]}: {r["test"]:.3f}' for r in out['layers']))
  write_json(os.path.join(workdir, 'probe.json'), results)
  with open(os.path.join(workdir, 'probe.md'), 'w') as f:
    f.write(table(results))
  plot(results, os.path.join(workdir, 'probe.png'))
  return results


def _rates(probe: ml_collections.ConfigDict) -> list[float]:
  """probe.learning_rates parsed as the study parses its grid."""
  try:
    return cells_lib.learning_rates(ml_collections.ConfigDict(
        {'study': {'learning_rates': probe.learning_rates}}))
  except ConfigError as e:
    raise ConfigError(f'probe.learning_rates={probe.learning_rates!r}: a comma-separated list '
                      'of positive numbers') from e


# Data fields that change where the data is read from or how fast, not what it holds.
_NOT_DATA = ('data_dir', 'num_threads')


def cache_key(config: ml_collections.ConfigDict, task: cells_lib.Task, fingerprint: str,
              rates: list[float], tokenizer, dataset: str) -> dict:
  """What a probe's result depends on: the base's weights (its fingerprint), the model, the
  task's data (`dataset`: its content, `datasets.dataset_description`), features and
  tokenizer, and the probe's budget, rates and seed."""
  key = {'base': fingerprint, 'task': task.name, 'head': task.head, 'dataset': dataset,
          'num_steps': int(config.probe.num_steps), 'learning_rates': rates,
          'seed': int(config.seed), 'model': config.model.to_dict(),
          'features': config.features.to_dict(),
          'data': {k: v for k, v in config.data.to_dict().items() if k not in _NOT_DATA},
          'tokenizer': (hashlib.sha256(tokenizer.serialize()).hexdigest()
                        if tokenizer is not None else None)}
  # As the cache file holds it (tuples become lists), so that a read key compares equal.
  return json.loads(json.dumps(key, sort_keys=True, default=str))


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _label(metric: str) -> str:
  return {'accuracy': 'accuracy %', 'cer': 'CER % (best path)'}[metric]


def table(results: dict) -> str:
  """A markdown table per task: one row per base, one column per layer (test scores, %)."""
  lines = ['# Layer probes', '',
           f'A linear probe per layer of each frozen base ({results["num_steps"]} Adam steps, '
           f'rates {", ".join(f"{r:g}" for r in results["learning_rates"])}, the rate chosen '
           'per layer on validation; test scores). Layer 0 is the frontend, layer k the output '
           'of block k. In bold and under "best": the layer with the best validation score.',
           '']
  for task, by_base in results['tasks'].items():
    first = next(iter(by_base.values()))
    n = len(first['layers'])
    lines += [f'## {task}: {_label(first["metric"])}', '',
              '| base | ' + ' | '.join(f'layer {k}' for k in range(n)) + ' | best |',
              '|---|' + '---|' * (n + 1)]
    for name, out in by_base.items():
      scores = [100 * r['test'] for r in out['layers']]
      # The best layer by validation (test is scored, never chosen on).
      best = (max if out['metric'] == 'accuracy' else min)(
          range(n), key=lambda k: out['layers'][k]['validation'])
      cells = [f'**{s:.1f}**' if k == best else f'{s:.1f}' for k, s in enumerate(scores)]
      lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {best} |')
    if first['metric'] == 'cer':
      lines += ['', 'Test WER % (best path) at the same rates:', '',
                '| base | ' + ' | '.join(f'layer {k}' for k in range(n)) + ' |',
                '|---|' + '---|' * n]
      for name, out in by_base.items():
        lines.append(f'| {name} | ' + ' | '.join(f'{100 * r["test_wer"]:.1f}'
                                                 for r in out['layers']) + ' |')
    lines.append('')
  return '\n'.join(lines)


def plot(results: dict, path: str) -> None:
  """Score against layer, one line per base, a panel per task."""
  # Imported here: matplotlib loads in about a second, and only the plot needs it.
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  tasks = list(results['tasks'])
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    metric = None
    for name, out in results['tasks'][task].items():
      metric = out['metric']
      ax.plot([r['layer'] for r in out['layers']], [100 * r['test'] for r in out['layers']],
              marker='o', label=name)
    ax.set_title(task)
    ax.set_xlabel('layer (0: frontend)')
    ax.set_ylabel(_label(metric))
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
