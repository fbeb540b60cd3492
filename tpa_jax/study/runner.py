"""Running a study: the base, the cells in order, learning rates chosen on validation, test
scored once, rows in `study.json`, then the report.

For each task and method: the first seed trains at every learning rate of the grid; the rate
whose run scores best on the validation split (at its best step) is chosen, for that task and
method; the other seeds train at that rate. Test is scored once per chosen run, with the state
of its best validation step. A TPA run at the chosen rate is also scored with its adapters
removed from the lowest k blocks, k = 0 .. N, without retraining (the pruning curve).

A finished cell leaves `trained.json` (and, when scored, `test.json`) in its folder; a re-run skips it, and a killed cell resumes
from its run checkpoint. `cells` (glob patterns over cell names such as `target_lang/tpa/*`)
selects a subset, so machines sharing one workdir can split a study.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback

import ml_collections
from absl import logging

from tpa_jax import sharding
from tpa_jax.config.presets import flatten
from tpa_jax.data import datasets
from tpa_jax.errors import ConfigError, UserError
from tpa_jax.study import base as base_lib
from tpa_jax.study import cells as cells_lib
from tpa_jax.study import report, scoring
from tpa_jax.study.cells import Cell, Task
from tpa_jax.train import loop
from tpa_jax.train.metrics import write_json

# Fields of the study config that do not change any cell's result: a workdir may be re-run or
# extended with different ones. A cell's folder names its rate, so a wider (or narrower) rate
# grid only adds runs, and may move the chosen rate.
_FREE_FIELDS = ('study.methods', 'study.tasks', 'study.seeds', 'study.learning_rates',
                'study.base_workdir',
                'study.compile_cache', 'study.workers', 'data.data_dir',
                'study.pruning_seeds', 'train.log_every_steps', 'data.num_threads',
                'data.eval_batch_size')


# Fields added to the study config after workdirs were written, with the value that an older
# workdir's study had: a workdir without them is of a study with that value.
_ADDED_FIELDS = {'study.base': 'supervised', 'study.bases': '', 'model.attention_impl': 'xla',
                 'model.attention_block': 128, 'data.text_normalization': 'none',
                 'tokenizer.file': ''}


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the study's config in `workdir/study_config.json`; refuses a workdir holding a
  study of another config, naming the differing fields."""
  path = os.path.join(workdir, 'study_config.json')
  current = flatten(json.loads(config.to_json()))
  if os.path.exists(path):
    with open(path) as f:
      saved = {**_ADDED_FIELDS, **flatten(json.load(f))}
    keys = sorted(k for k in set(saved) | set(current)
                  if k not in _FREE_FIELDS and saved.get(k) != current.get(k))
    if keys:
      raise UserError(
          f'{workdir} holds a study of another config: ' + '; '.join(
              f'{k}: workdir {saved.get(k)!r}, config {current.get(k)!r}' for k in keys) +
          '. Use another --workdir, or the config of that study.')
  os.makedirs(workdir, exist_ok=True)
  write_json(path, json.loads(config.to_json()))


def validate(config: ml_collections.ConfigDict) -> tuple[list[Task], list[str], list[float]]:
  """Every name of the study checked before anything runs: tasks, methods, rates, seeds."""
  s = config.study
  tasks = cells_lib.parse_tasks(config)
  methods = cells_lib.split_list(s.methods)
  if not methods:
    raise ConfigError(f'study.methods names no method; accepted methods are '
                      f'{cells_lib.method_names_help()}')
  for m in methods:
    cells_lib.method_overrides(m, s, config.model.num_blocks)
  rates = cells_lib.learning_rates(config)
  base_lib.check(config)
  if int(s.seeds) < 1:
    raise ConfigError(f'study.seeds={s.seeds}: the number of seeds, at least 1')
  if int(s.eval_every_steps) < 1 or int(s.num_steps) < 1:
    raise ConfigError('study.num_steps and study.eval_every_steps must be positive integers')
  return tasks, methods, rates


class Study:
  """One study over one base in one workdir."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, os.path.abspath(workdir)
    self.tasks, self.methods, self.rates = validate(config)
    self.seeds = list(range(int(config.study.seeds)))
    self.mesh = None
    self.base_path = self.data_dir = None

  # -- the base and data ---------------------------------------------------------------------
  def prepare(self) -> None:
    """The base (given, the demo's cached one, or pre-trained here once) and every task's data."""
    self.mesh = sharding.make_mesh(**self.config.mesh)
    self.base_path, self.data_dir = base_lib.resolve(self.config, self.workdir, self.mesh)
    logging.info('study base: %s; data: %s', self.base_path, self.data_dir)
    # Every task's corpus, tokenizer and split indexes, once (workers then only read them).
    for task in self.tasks:
      config = self.run_config(Cell(task, self.methods[0], self.rates[0], self.seeds[0]))
      data, tokenizer = datasets.open_for_config(config, self.workdir, self.mesh)
      data.index(config.data.train_split, tokenizer)
      for split in (config.data.validation_split, 'test'):
        data.index(split)

  # -- cells ------------------------------------------------------------------------------------
  def folder(self, cell: Cell) -> str:
    return os.path.join(self.workdir, cell.folder)

  def run_config(self, cell: Cell) -> ml_collections.ConfigDict:
    return cells_lib.run_config(self.config, cell, base_path=self.base_path,
                                data_dir=self.data_dir,
                                tokenizer_dir=os.path.join(self.workdir, 'tokenizers'))

  def rate_task(self, task: Task) -> Task:
    """The task whose validation chooses `task`'s learning rates: itself, or the first task."""
    return task if self.config.study.rate_selection == 'each' else self.tasks[0]

  def grid(self, task: Task, method: str) -> list[Cell]:
    """The runs that choose `method`'s learning rate for `task`: its first seed at every rate."""
    return [Cell(self.rate_task(task), method, lr, self.seeds[0]) for lr in self.rates]

  def chosen_rate(self, task: Task, method: str) -> float | None:
    """The grid's rate with the best validation score (None until every grid run is done)."""
    scores = {}
    for cell in self.grid(task, method):
      record = self.trained(cell)
      if record is None:
        return None
      if record['status'] == 'ok':
        scores[cell.learning_rate] = record['validation']
    if not scores:
      return self.rates[0]  # every rate failed: the failure is reported at the first
    lower = self.rate_task(task).metric == 'wer'
    return min(scores, key=lambda lr: (scores[lr] if lower else -scores[lr]))

  def trained(self, cell: Cell) -> dict | None:
    """The training record of `cell` (None until it has trained)."""
    return _record(os.path.join(self.folder(cell), 'trained.json'))

  def plan(self) -> list[tuple[Cell, bool]]:
    """Every (cell, scored on test?) in run order: costliest methods first (so that workers
    taking cells in this order end together), each method's grid before its other runs at the
    chosen rate."""
    out = []
    for method in sorted(self.methods, key=lambda m: -_WEIGHT.get(m, 1.0)):
      for task in self.tasks:
        grid = self.grid(task, method)
        if grid[0].task == task:
          out += [(cell, None) for cell in grid]  # test only if its rate is chosen
        seeds = self.seeds[1:] if grid[0].task == task else self.seeds
        out += [(Cell(task, method, None, seed), True) for seed in seeds]
    return out

  @staticmethod
  def selected(cell: Cell, patterns: list[str]) -> bool:
    """Whether `task/method/seed=N` matches one of the glob `patterns` (none: every cell)."""
    name = f'{cell.task.short}/{cell.method}/seed={cell.seed}'
    return not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)

  def run(self, patterns: list[str] = (), claims: str = '', report: bool = True) -> list[dict]:
    """Runs every selected cell not yet finished; returns the rows of `study.json` (written
    with the report when `report`). With `claims` (a folder shared by the workers of one
    launch), this process is one of several: it takes the next cell in plan order that no
    other has claimed, so the workers stay busy until the study ends."""
    if claims:  # a worker: imports while the launching process checks the workdir and
      _wait_for_launcher(claims)  # prepares the base and data
    else:
      check_workdir(self.config, self.workdir)
    self.prepare()
    todo = [c for c, _ in self.plan()
            if self.selected(c, list(patterns)) and not self._finished(c)]
    total, count, start, done_seconds = len(todo), 0, time.perf_counter(), []
    while todo:
      cell = self._next(todo, claims)
      if cell is None:  # the rest waits for learning-rate grids that other workers train
        time.sleep(2.0)
        continue
      t0 = time.perf_counter()
      ran = self.run_cell(cell)
      if cell in self.grid(cell.task, cell.method):  # test once the grid has chosen
        rate = self.chosen_rate(cell.task, cell.method)
        chosen = Cell(cell.task, cell.method, rate, cell.seed)
        if rate is not None and _claim(claims, ('test', *self._key(chosen))):
          ran |= self.score_cell(chosen)
      else:
        ran |= self.score_cell(cell)
      if ran:
        done_seconds.append(time.perf_counter() - t0)
      if claims:  # counted here, between cells, rather than by the report at the end
        scoring.flops_ratio(self, cell.task, cell.method)
      count += 1
      pace = sum(done_seconds) / len(done_seconds) if done_seconds else 0.0
      line = (f'[study] {count}/{total} {cell.name}: {self.status_line(cell)} | elapsed '
              f'{_duration(time.perf_counter() - start)}, ETA {_duration(len(todo) * pace)}')
      logging.info('%s', line)
      if not claims:
        print(line, flush=True)
    return self.write_report() if report else []

  def _next(self, todo: list[Cell], claims: str) -> Cell | None:
    """Takes (removes from `todo`) the first cell that can run now, its rate resolved; None if
    every cell left waits for a grid. Cells claimed by another worker are dropped."""
    for cell in list(todo):
      if cell.learning_rate is None:
        rate = self.chosen_rate(cell.task, cell.method)
        if rate is None:
          grid = self.grid(cell.task, cell.method)
          if any(g in todo or (claims and _claimed(claims, self._key(g))) for g in grid):
            continue  # its grid is still to train (here or by another worker)
          logging.warning('skipping %s/%s seed %d: the learning-rate grid (seed %d) is not '
                          'finished (run its cells first)', cell.task.short, cell.method,
                          cell.seed, self.seeds[0])
          todo.remove(cell)
          continue
        resolved = Cell(cell.task, cell.method, rate, cell.seed)
      else:
        resolved = cell
      todo.remove(cell)
      if _claim(claims, self._key(resolved)):
        return resolved
    return None

  def run_workers(self, argv: list[str], patterns: list[str] = ()) -> list[dict]:
    """Runs the study in `study.workers` processes (each taking the next unclaimed cell,
    logging to `<workdir>/worker-<i>.log`), printing one progress line per finished cell with
    an ETA for the whole study, then writes the report. Each process gets its share of the
    cores (PJRT_NPROC): at the demo's size a step gains little from a second thread, so two
    one-thread processes on two cores train about 1.7 times as fast as one."""
    check_workdir(self.config, self.workdir)
    n = int(self.config.study.workers)
    todo = [c for c, _ in self.plan() if self.selected(c, list(patterns))]
    # The workers of this launch claim cells in one folder of their own (other machines sharing
    # the workdir launch with their own), each taking the next unclaimed cell in plan order.
    claims = os.path.join(self.workdir, 'claims', f'{socket.gethostname()}-{os.getpid()}')
    os.makedirs(claims, exist_ok=True)
    # The cores are shared out: measured on 2 cores, two one-thread processes step at 0.30 s
    # each where one two-thread process steps at 0.26 s, and two two-thread ones at 0.67 s.
    env = {**os.environ, 'PJRT_NPROC': str(max(1, (os.cpu_count() or 1) // n))}
    procs = []
    for i in range(n):
      log = open(os.path.join(self.workdir, f'worker-{i}.log'), 'w')
      procs.append((subprocess.Popen([sys.executable, *argv, f'--worker={claims}'], env=env,
                                     stdout=log, stderr=subprocess.STDOUT), log))
    reported, newly_done = set(), 0
    try:
      # The base and data once, before the workers read them (they import meanwhile).
      self.prepare()
      with open(os.path.join(claims, _PREPARED), 'w'):
        pass
      start = time.perf_counter()
      already = {self._key(c) for c in todo if self._finished(c)}
      while True:
        running = any(p.poll() is None for p, _ in procs)
        for cell in todo:
          key = self._key(cell)
          if key in reported or not self._finished(cell):
            continue
          reported.add(key)
          if key not in already:
            newly_done += 1
          left = len(todo) - len(reported)
          elapsed = time.perf_counter() - start
          pace = elapsed / newly_done if newly_done else 0.0
          shown = self._resolved(cell)
          print(f'[study] {len(reported)}/{len(todo)} {shown.name}: {self.status_line(shown)} | '
                f'elapsed {_duration(elapsed)}, ETA {_duration(left * pace)}', flush=True)
        if not running:
          break
        if any(p.poll() not in (None, 0) for p, _ in procs):
          break  # a worker failed: the others may wait for its cells; a re-run resumes them
        time.sleep(2.0)
    finally:
      for p, log in procs:
        if p.poll() is None:
          p.terminate()
        p.wait()
        log.close()
      shutil.rmtree(claims, ignore_errors=True)
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
      logging.error('study workers %s ended with an error: see %s', failed,
                    ', '.join(os.path.join(self.workdir, f'worker-{i}.log') for i in failed))
    return self.write_report()

  @staticmethod
  def _key(cell: Cell) -> tuple:
    return (cell.task, cell.method, cell.learning_rate, cell.seed)

  def _resolved(self, cell: Cell) -> Cell:
    if cell.learning_rate is not None:
      return cell
    return Cell(cell.task, cell.method, self.chosen_rate(cell.task, cell.method), cell.seed)

  def _finished(self, cell: Cell) -> bool:
    """Trained (and, when its rate is the chosen one, scored on test)."""
    if cell.learning_rate is None:
      rate = self.chosen_rate(cell.task, cell.method)
      if rate is None:
        return False
      cell = Cell(cell.task, cell.method, rate, cell.seed)
    record = self.trained(cell)
    if record is None:
      return False
    if record['status'] != 'ok':
      return True
    rate = self.chosen_rate(cell.task, cell.method)
    if rate is None:
      return False  # a grid cell: done once the grid has chosen and (if chosen) scored
    return rate != cell.learning_rate or self.scored(cell) is not None

  def status_line(self, cell: Cell) -> str:
    record = self.trained(cell)
    if record is None:
      return 'not run'
    if record['status'] != 'ok':
      return f"failed: {record['status']}"
    text = f"validation {record['metric']} {record['validation']:.4f}"
    scored = self.scored(cell)
    if scored is not None and scored.get('status') == 'ok':
      text += f", test {scored['test']:.4f}"
    return text + f" ({record['seconds']['total']:.0f} s)"

  # -- one cell ---------------------------------------------------------------------------------
  def run_cell(self, cell: Cell) -> bool:
    """Trains `cell` (resuming it) unless it is done; writes `trained.json`. True if it ran."""
    if self.trained(cell) is not None:
      return False
    folder = self.folder(cell)
    os.makedirs(folder, exist_ok=True)
    config = self.run_config(cell)
    t0 = time.perf_counter()
    record = {'task': cell.task.name, 'method': cell.method, 'seed': cell.seed,
              'learning_rate': cell.learning_rate, 'metric': cell.task.metric}
    try:
      results = loop.train(config, folder)
      loss = results.get('loss', float('nan'))
      if not math.isfinite(loss) or results.get('skipped_steps', 0) >= config.train.num_steps:
        raise FloatingPointError(f'non-finite loss ({loss}) at step {results["step"]}')
      if results.get('preempted'):
        raise KeyboardInterrupt('preempted')
      v = results['validation']
      record.update(status='ok', validation=v['best'], best_step=v['best_step'],
                    validation_history=v['history'],
                    trainable_params=results['trainable_params'],
                    total_params=results['total_params'],
                    trainable_fraction=results['trainable_fraction'],
                    steps_per_second=results.get('steps_per_second'))
      record['seconds'] = self._seconds(folder, time.perf_counter() - t0, config)
    except (KeyboardInterrupt, SystemExit):
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.error('cell %s failed: %s', cell.name, traceback.format_exc())
      record.update(status=f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}',
                    seconds={'total': time.perf_counter() - t0})
    write_json(os.path.join(folder, 'trained.json'), record)
    return True

  def _seconds(self, folder: str, total: float, config) -> dict:
    """Where a cell's time went: compile (estimated from the first logged steps' pace),
    training steps, validation, the rest (setup, base restore, checkpoints)."""
    out = {'total': round(total, 1)}
    try:
      with open(os.path.join(folder, 'metrics.jsonl')) as f:
        lines = [json.loads(l) for l in f if l.strip()]
      train = [l for l in lines if l.get('stage', 'train') == 'train' and 'elapsed_seconds' in l]
      with open(os.path.join(folder, 'validation.json')) as f:
        out['validation'] = round(json.load(f).get('seconds', 0.0), 1)
      if len(train) >= 2:
        (a, b) = train[0], train[-1]
        pace = (b['elapsed_seconds'] - a['elapsed_seconds']) / max(b['step'] - a['step'], 1)
        out['compile'] = round(max(a['elapsed_seconds'] - a['step'] * pace, 0.0), 1)
        out['train_steps'] = round(config.train.num_steps * pace, 1)
        out['step_seconds'] = round(pace, 4)
    except (OSError, ValueError, KeyError):
      pass
    return out

  def scored(self, cell: Cell) -> dict | None:
    """The test record of `cell` (None until it is scored)."""
    return _record(os.path.join(self.folder(cell), 'test.json'))

  def score_cell(self, cell: Cell) -> bool:
    """Scores test once with the best validation step's state (and the pruning curve of TPA
    over every block); writes `test.json`. True if it ran."""
    record = self.trained(cell)
    if record is None or record['status'] != 'ok' or self.scored(cell) is not None:
      return False
    folder = self.folder(cell)
    t0 = time.perf_counter()
    pruning = (cell.method == 'tpa' and cell.seed < int(self.config.study.pruning_seeds))
    try:
      out = scoring.score(self.run_config(cell), folder, self.mesh, pruning=pruning)
      out['status'] = 'ok'
    except (KeyboardInterrupt, SystemExit):
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.error('scoring %s failed: %s', cell.name, traceback.format_exc())
      out = {'status': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'}
    out['seconds'] = round(time.perf_counter() - t0, 1)
    write_json(os.path.join(folder, 'test.json'), out)
    return True

  # -- rows and report --------------------------------------------------------------------------
  def rows(self) -> list[dict]:
    """One row per task x method x seed with a chosen rate (whatever exists on disk)."""
    rows = []
    for task in self.tasks:
      for method in self.methods:
        rate = self.chosen_rate(task, method)
        grid = {f'{c.learning_rate:g}': _grid_entry(self.trained(c))
                for c in self.grid(task, method)}
        if rate is None:
          continue
        flops = scoring.flops_ratio(self, task, method)
        for seed in self.seeds:
          cell = Cell(task, method, rate, seed)
          trained = self.trained(cell)
          if trained is None:
            continue
          row = {k: trained.get(k) for k in ('task', 'method', 'seed', 'learning_rate',
                                             'metric', 'trainable_params', 'total_params',
                                             'trainable_fraction', 'validation', 'best_step')}
          row['learning_rate_grid'] = grid
          row['step_flops_vs_full'] = flops
          scored = self.scored(cell) or {}
          status = trained['status'] if trained['status'] != 'ok' else scored.get(
              'status', 'not scored')
          row.update(test=scored.get('test'), best_path_test=scored.get('best_path_test'),
                     cer_test=scored.get('cer_test'), status=status,
                     seconds={**trained.get('seconds', {}),
                              'test': scored.get('seconds')},
                     folder=cell.folder)
          for key in ('pruning', 'pruning_from_top'):
            if key in scored:
              row[key] = scored[key]
          rows.append(row)
    return rows

  def write_report(self) -> list[dict]:
    rows = self.rows()
    write_json(os.path.join(self.workdir, 'study.json'), rows)
    report.write(rows, self.workdir, self.config)
    return rows


# Relative cost of a method's runs (others 1), to start the costliest first.
_WEIGHT = {'full': 2.0, 'head': 0.6}


_PREPARED = 'prepared'  # in the claims folder: the launching process has prepared


def _wait_for_launcher(claims: str) -> None:
  """A worker's start: TensorFlow imported while waiting, then waiting until the launching
  process has prepared the base and every task's data (it may be pre-training the base)."""
  try:
    # What TFDS's audio features import on first use (~10 s): imported while the launcher
    # prepares, not when the first cell reads its data.
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pass
  parent = os.getppid()
  while not os.path.exists(os.path.join(claims, _PREPARED)):
    if os.getppid() != parent:
      raise SystemExit('the launching process of this study worker ended')
    time.sleep(1.0)


def _claim_path(claims: str, key: tuple) -> str:
  return os.path.join(claims, '_'.join(str(k) for k in key).replace('/', '-').replace(':', '-'))


def _claim(claims: str, key: tuple) -> bool:
  """Claims `key` for this worker (atomically: the first to create its file); True without
  `claims` (a single process takes everything)."""
  if not claims:
    return True
  try:
    os.close(os.open(_claim_path(claims, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def _claimed(claims: str, key: tuple) -> bool:
  return os.path.exists(_claim_path(claims, key))


def _record(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _grid_entry(record: dict | None):
  """A grid run's validation score, its failure, or None (not run)."""
  if record is None:
    return None
  return record['validation'] if record['status'] == 'ok' else f"failed: {record['status']}"


def _duration(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')
