"""Serving many tasks from one frozen encoder: mixed-task batches, shared frozen prefixes, bytes
per added task, and a load test of the running server.

Usage:
  python benchmarks/serving.py                  # demo-size model (6 x 144), about 4 min on 2 cores
  python benchmarks/serving.py --model=tiny --requests=8   # a smoke run
  python benchmarks/serving.py --set=model.dtype=bfloat16 --set=train.frozen_dtype=bfloat16

The base is the demo's architecture with random weights (speed does not depend on them), saved
to --workdir; the 8 tasks are adapter exports with random adapter and head weights: TPA at r=32
and r=16, TPA on the upper half, the serial adapter at TPA's parameters, the serial FFN
adapter, LoRA, and two language-ID classifiers (TPA, and TPA on the upper half). Every figure
is a ratio or a count measured in this run, after warm-up. One JSON object per line:
- mixed_vs_single: throughput of batches mixing the 8 tasks over that of the same batches all
  of one task (target >= 0.9);
- mixed_vs_per_task: the mixed batches over the same requests split into per-task batches of
  one single-task model per task (each only its own adapters);
- shared_prefix_vs_separate: 4 tasks with adapters on the upper half on the same utterances,
  run as one batch (frozen prefix once), over 4 separate passes (target <= 0.7);
- bytes_per_added_task: an adapter export's bytes and their ratio to the base's;
- load_test: the server (launch/serve.py) on localhost at concurrency 1, 8 and 32, mixed tasks:
  throughput, p50/p99 latency, and `lost_requests` / `misrouted_requests` (each response checked
  against the offline result of its task for the same audio; both must be 0).
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from tpa_jax import checkpoint
from tpa_jax import config as config_lib
from tpa_jax import sharding
from tpa_jax.checkpoint import adapter_file
from tpa_jax.checkpoint import spec as spec_lib
from tpa_jax.data.tokenizer import CharTokenizer
from tpa_jax.eval import decoding
from tpa_jax.serve import multitask
from tpa_jax.nn import build
from tpa_jax.train import partition
from tpa_jax.train import trainer as trainer_lib

ALPHABET = 'abcdefghijklmnopqrstuvwxyz \''
LABELS = ['en', 'es', 'de', 'fr', 'it']
# name -> (method, overrides)
TASKS = {
    'tpa': ('tpa', {'adapter.bottleneck': 32}),
    'tpa_r16': ('tpa', {'adapter.bottleneck': 16}),
    'tpa_upper': ('tpa', {'adapter.bottleneck': 32, 'adapter.blocks': 'upper'}),
    'serial_x2': ('block_sequential', {'adapter.bottleneck': 64}),
    'ff_serial': ('ff_sequential', {'adapter.bottleneck': 32}),
    'lora': ('lora', {'adapter.bottleneck': 5, 'adapter.lora_alpha': 10.0}),
    'lid': ('tpa', {'adapter.bottleneck': 32, 'head.kind': 'classification'}),
    'lid_upper': ('tpa', {'adapter.bottleneck': 32, 'adapter.blocks': 'upper',
                          'head.kind': 'classification'}),
}
UPPER = ['tpa_upper', 'lid_upper', 'serial_upper', 'lora_upper']  # for the shared prefix


def base_config(model: str, sets: list[str]):
  config = config_lib.load_config_file('configs/demo.py:tiny' if model == 'tiny'
                                       else 'configs/demo.py')
  config.data.bucket_seconds = (4.0,)
  for item in sets:
    key, _, value = item.partition('=')
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  return config


def task_config(config, method: str, overrides: dict):
  c = ml_collections.ConfigDict(config.to_dict())
  config_lib.apply_method(c, method)
  n = c.model.num_blocks
  for key, value in overrides.items():
    if value == 'upper':
      value = f'{n // 2}:{n}'
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.head.vocab_size = len(ALPHABET) + 1
  c.head.num_classes = len(LABELS)
  return c


def make_tasks(config, base_path: str, workdir: str, mesh, fingerprint: dict):
  """Adapter exports of TASKS (random adapter and head weights) and their single-task models."""
  tasks = dict(TASKS)
  tasks['serial_upper'] = ('block_sequential', {'adapter.bottleneck': 64, 'adapter.blocks': 'upper'})
  tasks['lora_upper'] = ('lora', {'adapter.bottleneck': 5, 'adapter.lora_alpha': 10.0,
                                  'adapter.blocks': 'upper'})
  exports, models = {}, {}
  for i, (name, (method, overrides)) in enumerate(tasks.items()):
    c = task_config(config, method, overrides)
    c.base.path = base_path
    model = trainer_lib.load_model(c, mesh)
    trainable = partition.trainable_filter(c.train.trainable)
    leaves, treedef = jax.tree.flatten(nnx.state(model, trainable))
    keys = jax.random.split(jax.random.key(100 + i), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
    spec = spec_lib.from_config(c, fingerprint['id'])
    path = os.path.join(workdir, f'{name}.safetensors')
    kind = ({'labels': LABELS} if c.head.kind == 'classification'
            else {'tokenizer': CharTokenizer(ALPHABET)})
    adapter_file.write_adapters(path, adapter_file.flat_arrays(nnx.state(model, trainable)), c, spec,
                          fingerprint, 0, **kind)
    exports[name], models[name] = path, (c, model)
  return exports, models


def timed(fn, repeats: int) -> float:
  """Median seconds of `fn()` over `repeats` runs after one warm-up run."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def load_test(args, config, exports, offline, utterances, workdir):
  """Runs launch/serve.py and sends it bounded mixed-task load; checks every response."""
  import base64  # pylint: disable=import-outside-toplevel

  import requests  # pylint: disable=import-outside-toplevel

  from tpa_jax.data import pcm  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  names = list(TASKS)
  cmd = [sys.executable, 'launch/serve.py', f'--config={args.config_file}',
         f'--config.base.path={config.base.path}', '--config.data.bucket_seconds=4.0',
         f'--adapters={",".join(f"{n}={exports[n]}" for n in names)}',
         f'--capacity={len(names)}', f'--port={port}', '--batch_sizes=1,8,32',
         f'--max_wait_ms={args.max_wait_ms}',
         *[f'--config.{s}' for s in args.set]]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, 'jax_cache'))
  log = open(os.path.join(workdir, 'server.log'), 'w')
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  url = f'http://127.0.0.1:{port}'
  try:
    start = time.time()
    while True:
      try:
        requests.get(f'{url}/healthz', timeout=1)
        break
      except requests.ConnectionError:
        if proc.poll() is not None or time.time() - start > 600:
          raise RuntimeError('the server did not start; see ' + log.name)
        time.sleep(0.5)
    emit({'metric': 'server_start_seconds', 'value': round(time.time() - start, 1)})
    compiled = requests.get(f'{url}/healthz').json()['compilations']
    wavs = [base64.b64encode(pcm.encode_wav(a, config.features.sample_rate_hz)).decode()
            for a in utterances]
    rng = np.random.default_rng(0)
    for concurrency in (1, 8, 32):
      n = args.requests * concurrency if concurrency > 1 else args.requests
      plan = [(int(rng.integers(len(utterances))), names[int(rng.integers(len(names)))])
              for _ in range(n)]

      def one(item, session=requests.Session()):
        u, task = item
        t0 = time.perf_counter()
        try:
          r = session.post(f'{url}/v1/recognize', json={'task': task, 'audio': wavs[u]},
                           timeout=120)
          body = r.json() if r.status_code == 200 else None
        except requests.RequestException:
          body = None
        return item, body, time.perf_counter() - t0

      t0 = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, plan))
      wall = time.perf_counter() - t0
      lost = misrouted = mismatched = 0
      for (u, task), body, _ in answers:
        if body is None or len(body.get('results', [])) != 1:
          lost += 1
          continue
        got = body['results'][0]
        want = offline[(u, task)]
        if got.get('task') != task:
          misrouted += 1
        elif not same_result(got, want):
          others = [t for t in names if t != task and same_result(
              {**got, 'task': t}, offline[(u, t)])]
          if others:
            misrouted += 1
          else:
            mismatched += 1
      latencies = sorted(s for *_, s in answers)
      emit({'metric': 'load_test', 'concurrency': concurrency, 'requests': n,
            'throughput_rps': round(n / wall, 2),
            'p50_ms': round(1000 * latencies[len(latencies) // 2], 1),
            'p99_ms': round(1000 * latencies[min(len(latencies) - 1,
                                                 int(0.99 * len(latencies)))], 1),
            'lost_requests': lost, 'misrouted_requests': misrouted,
            'numeric_mismatches': mismatched})
    health = requests.get(f'{url}/healthz').json()
    emit({'metric': 'server_compilations_after_warmup',
          'value': health['compilations'] - compiled})
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # never leave a server behind
      proc.kill()
      proc.wait()
    log.close()


def same_result(got: dict, want: dict) -> bool:
  if 'text' in want:
    return got == want
  return (got.get('task') == want['task'] and got.get('label') == want['label'] and
          abs(got.get('probability', -1) - want['probability']) < 1e-4)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='demo', choices=['demo', 'tiny'])
  parser.add_argument('--workdir', default='')
  parser.add_argument('--requests', type=int, default=4,
                      help='load test: requests per concurrent client (concurrency 1: x1)')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--max_wait_ms', type=float, default=5.0)
  parser.add_argument('--select', default='gather', choices=['gather', 'onehot'])
  parser.add_argument('--set', action='append', default=[], help='config overrides KEY=VALUE')
  parser.add_argument('--no_server', action='store_true')
  args = parser.parse_args()
  args.config_file = 'configs/demo.py:tiny' if args.model == 'tiny' else 'configs/demo.py'
  workdir = args.workdir or tempfile.mkdtemp(prefix='tpa_serving_')
  os.makedirs(workdir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  t_start = time.time()

  # -- base and tasks ---------------------------------------------------------------------------
  config = base_config(args.model, args.set)
  mesh = sharding.make_mesh()
  base_path = os.path.join(workdir, 'base')
  base = build.create_model(config, mesh, seed=0)
  checkpoint.save_state(base_path, checkpoint.base_state(base))
  config.base.path = base_path
  loaded = trainer_lib.load_model(multitask.base_config(config), mesh)
  fingerprint = checkpoint.base_fingerprint(config.model, loaded)
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(checkpoint.base_state(loaded)))
  exports, models = make_tasks(config, base_path, workdir, mesh, fingerprint)
  model = multitask.MultiTaskModel(config, mesh, tasks=exports, capacity=len(exports),
                                   batch_sizes=(8, 32), select=args.select)
  model.warmup()
  sr = config.features.sample_rate_hz
  rng = np.random.default_rng(0)
  utterances = [rng.normal(0, 2000, int(sr * rng.uniform(3.0, 4.0))).astype(np.int16)
                for _ in range(32)]
  emit({'metric': 'setup', 'model': args.model, 'dim': config.model.dim,
        'blocks': config.model.num_blocks, 'devices': jax.device_count(),
        'platform': jax.devices()[0].platform, 'select': args.select,
        'seconds': round(time.time() - t_start, 1)})

  # -- mixed vs single --------------------------------------------------------------------------
  names = list(TASKS)
  batches = [list(range(i, i + 8)) for i in range(0, 32, 8)]
  mixed = lambda: [model.infer([utterances[i] for i in b], [[names[i % 8]] for i in b])
                   for b in batches]
  single = lambda: [model.infer([utterances[i] for i in b], [[names[0]] for i in b])
                    for b in batches]
  t_mixed, t_single = timed(mixed, args.repeats), timed(single, args.repeats)
  emit({'metric': 'mixed_vs_single', 'value': round(t_single / t_mixed, 3), 'target': '>= 0.9',
        'mixed_s': round(t_mixed, 4), 'single_s': round(t_single, 4), 'rows': 32})

  # -- how rows read the bank: per-example gather against a one-hot product -------------------
  other = 'onehot' if args.select == 'gather' else 'gather'
  other_model = multitask.MultiTaskModel(config, mesh, tasks=exports, capacity=len(exports),
                                         batch_sizes=(8, 32), select=other)
  other_model.warmup()
  t_other = timed(lambda: [other_model.infer([utterances[i] for i in b],
                                             [[names[i % 8]] for i in b]) for b in batches],
                  args.repeats)
  emit({'metric': 'select', 'chosen': args.select, 'chosen_s': round(t_mixed, 4),
        other: round(t_other, 4), 'chosen_speedup': round(t_other / t_mixed, 3),
        'batches': 'the mixed batches above'})
  del other_model

  # -- mixed vs one model per task --------------------------------------------------------------
  from tpa_jax.audio.featurizer import featurizer as make_featurizer  # pylint: disable=import-outside-toplevel
  featurizer = make_featurizer(config)
  samples = model.length_buckets[0]
  forwards = {}
  for name in names:
    c, m = models[name]
    graphdef, state = nnx.split(m)

    def forward(state, audio, lengths, graphdef=graphdef):
      features, mask = featurizer(audio, lengths)
      logits, out_mask = nnx.merge(graphdef, state)(features, mask)
      return logits, out_mask
    forwards[name] = (jax.jit(forward), state)

  def per_task():
    out = []
    for t, name in enumerate(names):  # the mixed batches' requests of task t: 4 utterances
      idx = [i for i in range(32) if i % 8 == t]
      audio = np.zeros((len(idx), samples), np.int16)
      lengths = np.array([len(utterances[i]) for i in idx], np.int32)
      for j, i in enumerate(idx):
        audio[j, :len(utterances[i])] = utterances[i]
      fn, state = forwards[name]
      logits, mask = jax.device_get(fn(state, audio, lengths))
      if logits.ndim == 3:
        out += [decoding.collapse(row.argmax(-1)[m]) for row, m in zip(logits, mask)]
      else:
        out += list(logits.argmax(-1))
    return out
  with jax.set_mesh(mesh):
    t_per_task = timed(per_task, args.repeats)
  emit({'metric': 'mixed_vs_per_task', 'value': round(t_per_task / t_mixed, 3),
        'mixed_s': round(t_mixed, 4), 'per_task_s': round(t_per_task, 4),
        'note': 'per-task batches of 4 rows, one single-task model (own program) per task'})

  # -- shared prefix ----------------------------------------------------------------------------
  eight = utterances[:8]
  shared = lambda: model.infer(eight, [UPPER] * 8)
  separate = lambda: [model.infer(eight, [[t]] * 8) for t in UPPER]
  t_shared, t_separate = timed(shared, args.repeats), timed(separate, args.repeats)
  # The same, the 32 rows run after the shared prefix in 4 batches of 8 rows: the batch shapes
  # of the separate passes (on a CPU a 32-row batch costs more than 4 of 8 rows).
  chunked = lambda: model.infer(eight, [UPPER] * 8, suffix_rows=8)
  t_chunked = timed(chunked, args.repeats)
  emit({'metric': 'shared_prefix_vs_separate', 'value': round(t_shared / t_separate, 3),
        'target': '<= 0.7', 'shared_s': round(t_shared, 4), 'separate_s': round(t_separate, 4),
        'shared_in_8_row_batches_s': round(t_chunked, 4),
        'value_in_8_row_batches': round(t_chunked / t_separate, 3),
        'tasks': UPPER, 'utterances': 8, 'blocks_shared': config.model.num_blocks // 2})

  # -- bytes ------------------------------------------------------------------------------------
  size = os.path.getsize(exports['tpa'])
  emit({'metric': 'bytes_per_added_task', 'value': size, 'base_bytes': base_bytes,
        'ratio_to_base': round(size / base_bytes, 4), 'task': 'tpa r=32 on every block',
        'trainable_params': model.tasks['tpa'].trainable_params})

  # -- load test --------------------------------------------------------------------------------
  if not args.no_server:
    offline = {}
    for t in names:
      for b in batches:
        for i, result in zip(b, model.infer([utterances[i] for i in b], [[t]] * len(b))):
          offline[(i, t)] = result[0]
    load_test(args, config, exports, offline, utterances, workdir)
  emit({'metric': 'total_seconds', 'value': round(time.time() - t_start, 1)})


if __name__ == '__main__':
  main()
