"""Trained tasks served together: each task's score, served in mixed batches over one frozen
base, against the same adapters evaluated alone.

Usage:
  python benchmarks/served_tasks.py --workdir=runs/served --runs=\
es=runs/study/cells/target_lang/tpa/lr=0.01/seed=0,\
acoustic=runs/study/cells/target_acoustic/tpa/lr=0.01/seed=0,\
lid=runs/study/cells/lang_id/tpa/lr=0.01/seed=0
  python benchmarks/served_tasks.py --workdir=/tmp/served --runs=es=runs/demo/adapt \
      --decoding=lexicon

Each run (a launch/train.py, study cell or demo adaptation run over the same base) is exported
with its adapters (launch/export.py --kind=adapter's export) and evaluated from that export
on --split (launch/evaluate.py --adapters): with best-path decoding, or with --decoding=lexicon
with the run's own decoding (the demo's and the study's: the lexicon decoder, which the export
carries). The split's usable
utterances of every task are written as WAV files and listed in one input file, the tasks'
lines interleaved, and launch/transcribe.py's path serves them all from one multi-task model
(--decoding as transcribe.py's): batches mix the tasks. One JSON object per line:
- served_task: per task, the served WER (CTC) or accuracy, the evaluated one, and
  the utterances each scored (`equal`: both the scores and the counts are equal);
- served_total: inputs written and skipped (by reason), batches, seconds and inputs/s (after
  warm-up).
"""

import argparse
import json
import os
import time

import jax
import ml_collections
import numpy as np

from tpa_jax import sharding
from tpa_jax.data import datasets, pcm
from tpa_jax.eval import scoring
from tpa_jax.programs import evaluate
from tpa_jax.serve import export, multitask


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def write_split(name: str, config: ml_collections.ConfigDict, workdir: str, mesh,
                split: str) -> list[tuple[str, str]]:
  """(WAV path, reference) of the usable utterances of `split`: a transcript, or a class name."""
  data, _ = datasets.open_for_config(config, workdir, mesh)
  index = data.index(split)
  source = data.source(split)
  rows = np.flatnonzero(index.keep)
  folder = os.path.join(workdir, 'wavs', name)
  os.makedirs(folder, exist_ok=True)
  out = []
  for r in rows:
    example = source[int(r)]
    path = os.path.join(folder, f'{int(r):06d}.wav')
    with open(path, 'wb') as f:
      f.write(pcm.encode_wav(np.asarray(example[data.spec.audio_key]).reshape(-1),
                             data.spec.sample_rate_hz))
    if config.head.kind == 'classification':
      reference = data.class_names[int(example[data.spec.label_key])]
    else:
      reference = data.text(example)
    out.append((path, reference))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', required=True, help='NAME=RUN_WORKDIR[,NAME=RUN_WORKDIR...]')
  parser.add_argument('--workdir', required=True, help='exports, WAV files and outputs')
  parser.add_argument('--split', default='test')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--decoding', default='best_path', choices=multitask.DECODINGS)
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  mesh = sharding.make_mesh()
  runs = multitask.parse_adapters(args.runs)  # the same NAME=PATH syntax

  exports, configs, evaluated, lines = {}, {}, {}, {}
  for name, run in runs.items():
    config = evaluate.run_config(run)
    if args.decoding == 'best_path':
      config.decoding.kind = 'greedy'
    exports[name] = os.path.join(args.workdir, f'{name}.safetensors')
    export.export_adapters(run, exports[name], mesh)
    evaluated[name] = evaluate.evaluate(config, os.path.join(args.workdir, f'eval-{name}'), mesh,
                                        split=args.split, adapters_path=exports[name])
    configs[name] = config
    lines[name] = write_split(name, config, os.path.join(args.workdir, f'eval-{name}'), mesh,
                              args.split)

  # One input file, the tasks' lines interleaved: every batch mixes them.
  order = []
  for i in range(max(len(v) for v in lines.values())):
    order += [(name, *lines[name][i]) for name in runs if i < len(lines[name])]
  tsv = os.path.join(args.workdir, 'inputs.tsv')
  with open(tsv, 'w') as f:
    f.writelines(f'{path}\t{name}\n' for name, path, _ in order)

  base = next(iter(configs.values()))
  model = multitask.MultiTaskModel(base, mesh, tasks=exports, capacity=len(exports),
                                   batch_sizes=(args.batch_size,), decoding_kind=args.decoding)
  model.warmup()
  output = os.path.join(args.workdir, 'outputs.jsonl')
  start = time.perf_counter()
  summary = multitask.transcribe(model, tsv, output)
  seconds = time.perf_counter() - start
  served = {int(r['line']): r['results'][0] for r in map(json.loads, open(output))}

  for name in runs:
    pairs = [(ref, served[i + 1]) for i, (n, _, ref) in enumerate(order)
             if n == name and i + 1 in served]
    record = {'metric': 'served_task', 'task': name, 'data': configs[name].data.name,
              'decoding': model.tasks[name].describe().get('decoding'),
              'utterances': len(pairs),
              'evaluated_utterances': evaluated[name]['num_utterances']}
    if configs[name].head.kind == 'classification':
      record['score'] = 'accuracy'
      record['served'] = float(np.mean([out['label'] == ref for ref, out in pairs]))
    else:
      record['score'] = 'wer'
      record['served'] = scoring.error_rates([r for r, _ in pairs],
                                             [o['text'] for _, o in pairs])['wer']
    record['evaluated'] = evaluated[name][record['score']]
    record['equal'] = (record['utterances'] == record['evaluated_utterances']
                       and abs(record['served'] - record['evaluated']) < 1e-9)
    emit(record)
  emit({'metric': 'served_total', 'tasks': len(runs), **summary,
        'inputs_per_second': round(summary['written'] / seconds, 1),
        'devices': jax.device_count(), 'platform': jax.devices()[0].platform})


if __name__ == '__main__':
  main()
