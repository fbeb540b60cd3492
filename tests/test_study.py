"""The study (launch/study.py), run as a user runs it: a tiny study end to end, re-run, killed
mid-cell and resumed; the best validation step scores test; bad input; the fairness plumbing
(one program for every learning rate; the demo base's cache key)."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import built_once, tiny_config
from tpa_jax import config as config_lib
from tpa_jax.config import cache_keys
from tpa_jax.data import random_task
from tpa_jax.errors import ConfigError, UserError
from tpa_jax.programs import demo
from tpa_jax.study import cells as cells_lib
from tpa_jax.study import publish, runner, scoring
from tpa_jax.train import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_FIELDS = ('task', 'method', 'seed', 'learning_rate', 'trainable_params', 'trainable_fraction',
              'metric', 'validation', 'test', 'best_path_test', 'step_flops_vs_full', 'seconds',
              'status')
# Fields of a row that depend on how long things took, not on what was computed.
TIMING = ('seconds',)


def study(workdir, *flags, wait=True):
  """launch/study.py on the tiny config, one device (as a user runs it), compiling into the
  test session's compilation cache."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  cache = os.environ['JAX_COMPILATION_CACHE_DIR']
  args = [sys.executable, 'launch/study.py', '--config=configs/study.py:tiny',
          f'--workdir={workdir}', f'--config.study.compile_cache={cache}', *flags]
  if not wait:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def rows_of(workdir):
  with open(os.path.join(workdir, 'study.json')) as f:
    rows = json.load(f)
  return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in rows),
                key=lambda r: (r['task'], r['method'], r['seed']))


@pytest.fixture
def tiny_study(tmp_path_factory):
  """The tiny study (2 tasks x 3 methods x 1 seed), run once uninterrupted (once per session:
  its workdir is shared by the tests' own studies)."""
  def build(root):
    result = study(str(root / 'a'))
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
  root, stdout = built_once(tmp_path_factory, 'tiny_study', build)
  return str(root / 'a'), stdout


@pytest.mark.slow(seconds=237)
def test_tiny_study_end_to_end_rerun_and_resume(tiny_study, tmp_path):
  workdir, first_stdout = tiny_study
  rows = rows_of(workdir)
  assert [(r['task'].split('/')[-1], r['method']) for r in rows] == [
      (t, m) for t in ('lang_id_tiny', 'target_lang_tiny') for m in ('head', 'lora', 'tpa')]
  for row in json.load(open(os.path.join(workdir, 'study.json'))):
    for field in ROW_FIELDS:
      assert field in row, field
    assert row['status'] == 'ok', row['status']
    assert row['metric'] == ('accuracy' if 'lang_id' in row['task'] else 'wer')
    if row['metric'] == 'wer':
      assert 0.0 <= row['best_path_test'] < 5.0
    else:
      assert 0.0 <= row['test'] <= 1.0
    assert 0 < row['trainable_fraction'] < 0.2 and 0 < row['step_flops_vs_full'] < 1.0
    assert {'total', 'compile', 'train_steps', 'validation', 'test'} <= set(row['seconds'])
  tpa = [r for r in rows if r['method'] == 'tpa']
  # TPA's no-retraining pruning curve: k = 0 .. 2 blocks removed, k = 0 is the test score.
  assert all([p['removed_lowest'] for p in r['pruning']] == [0, 1, 2] and
             r['pruning'][0]['test'] == r['test'] for r in tpa)
  # ... and from the highest k: removing all of them is the same model from either end.
  assert all([p['removed_highest'] for p in r['pruning_from_top']] == [0, 1, 2] and
             r['pruning_from_top'][-1]['test'] == r['pruning'][-1]['test'] for r in tpa)
  for name in ('study.md', 'pareto.png', 'pruning.png', 'study_config.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  table = open(os.path.join(workdir, 'study.md')).read()
  assert '| tpa |' in table and '±' in table and '| lowest |' in table and '| highest |' in table
  assert first_stdout.count('[study] ') == 6 and 'ETA' in first_stdout
  # Validation every 3 steps, in the metrics file (and TensorBoard) of each cell.
  cell = os.path.join(workdir, tpa[-1]['folder'])
  logged = [json.loads(l) for l in open(os.path.join(cell, 'metrics.jsonl'))]
  assert [l['step'] for l in logged if l.get('stage') == 'validation'] == [3, 6, 9, 12]
  assert os.listdir(os.path.join(cell, 'tensorboard'))

  # A re-run trains nothing: every cell's records stay as they were.
  records = sorted(p for p in _walk(workdir) if p.endswith(('trained.json', 'test.json')))
  stamps = {p: os.stat(p).st_mtime_ns for p in records}
  again = study(workdir)
  assert again.returncode == 0, again.stderr[-4000:]
  assert {p: os.stat(p).st_mtime_ns for p in records} == stamps
  assert '[train] step' not in again.stderr and 'validation at step' not in again.stderr
  assert rows_of(workdir) == rows

  # Killed in the middle of a cell (its step-3 checkpoint written), then run again: the same
  # study.json as the uninterrupted run. It reuses the first study's base and corpus.
  other = str(tmp_path / 'b')
  flags = (f'--config.study.base_workdir={workdir}',
           f'--config.data.data_dir={os.path.join(workdir, "data")}')
  proc = study(other, *flags, wait=False)
  victim = os.path.join(other, 'cells', 'lang_id_tiny', 'lora', 'lr=0.003', 'seed=0')
  marker = os.path.join(victim, 'checkpoints', '3', 'commit_success.txt')
  deadline = time.time() + 600
  while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert os.path.exists(marker) and not os.path.exists(os.path.join(victim, 'trained.json'))
  # Resumed by two worker processes taking cells from one queue (the killed cell among them).
  resumed = study(other, *flags, '--config.study.workers=2')
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  logs = [open(os.path.join(other, f'worker-{i}.log')).read() for i in range(2)]
  assert sum('resumed from step 3' in log for log in logs) == 1
  taken = [re.findall(r'\[study\] \d+/\d+ (\S+):', log) for log in logs]
  # Each cell left was taken by exactly one worker: the killed one and the two after it.
  assert sorted(taken[0] + taken[1]) == sorted(
      f'{t}/{m}/lr=0.003/seed=0' for t, m in
      (('lang_id_tiny', 'lora'), ('target_lang_tiny', 'head'), ('lang_id_tiny', 'head')))
  assert resumed.stdout.count('[study] ') == 6 and rows_of(other) == rows
  assert not os.listdir(os.path.join(other, 'claims'))  # the launch's claims are cleared


def _walk(root):
  for folder, _, files in os.walk(root):
    for name in files:
      yield os.path.join(folder, name)


def test_a_published_study_is_its_own_table_and_plots_under_their_provenance(tiny_study,
                                                                             tmp_path):
  workdir, _ = tiny_study
  first = json.load(open(os.path.join(workdir, 'provenance.json')))['launches'][0]
  assert first['command'].startswith('python launch/study.py --config=configs/study.py:tiny')
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  assert first['commit'].split('+')[0] == head and first['finished'] >= first['started']
  assert f'{os.cpu_count()} CPU cores' in first['machine']
  dest = tmp_path / 'docs' / 'results' / 'tiny'
  dest.mkdir(parents=True)
  (dest / 'stale.png').write_bytes(b'from an earlier publication')
  written = publish.publish(workdir, str(dest), quiet='no', publish_command='python x --publish')
  assert sorted(os.path.basename(p) for p in written) == ['pareto.png', 'pruning.png', 'study.md']
  assert sorted(os.listdir(dest)) == ['pareto.png', 'pruning.png', 'study.md']
  for name in ('pareto.png', 'pruning.png'):
    assert (dest / name).read_bytes() == open(os.path.join(workdir, name), 'rb').read()
  page = (dest / 'study.md').read_text()
  table = open(os.path.join(workdir, 'study.md')).read()
  assert table.removeprefix('# Study\n').strip() in page  # copied, every line of it
  assert page.startswith('# Study results: tiny\n')
  assert 'Published by `python x --publish`' in page
  assert f"Run by `{first['command']}`" in page and f"at commit {first['commit']}" in page
  assert 'Quiet: no' in page and '![pareto](pareto.png)' in page
  with pytest.raises(ConfigError, match=r"--publish_quiet='maybe': accepted values are"):
    publish.publish(workdir, str(dest), quiet='maybe')
  with pytest.raises(ConfigError, match='nothing to publish: .* does not exist'):
    publish.publish(str(tmp_path / 'no_study'), str(dest))


def test_the_best_validation_step_is_the_one_that_scores_test(tiny_study, mesh1):
  workdir, _ = tiny_study
  config = config_lib.load_config_file('configs/study.py:tiny')
  s = runner.Study(config, workdir)
  s.mesh, s.data_dir = mesh1, os.path.join(workdir, 'data')
  s.base_path = os.path.join(workdir, 'base', 'encoder')
  task = next(t for t in s.tasks if t.head == 'ctc')
  cell = cells_lib.Cell(task, 'tpa', s.rates[0], 0)
  folder = s.folder(cell)
  history = json.load(open(os.path.join(folder, 'validation.json')))
  wers = [(h['wer'], h['cer']) for h in history['history']]
  best_step = history['history'][wers.index(min(wers))]['step']
  assert history['best_step'] == best_step
  assert sorted(os.listdir(os.path.join(folder, 'best'))) == [str(best_step)]
  recorded = json.load(open(os.path.join(folder, 'test.json')))
  assert recorded['step'] == best_step
  # Scoring that checkpoint again gives the recorded test score; the last step's differs in
  # its state (the run went on training after its best step, or the best is the last).
  again = scoring.score(s.run_config(cell), folder, mesh1, pruning=False)
  assert again['step'] == best_step and again['test'] == recorded['test']
  assert again['best_path_test'] == recorded['best_path_test']


def test_bad_names_are_refused_before_anything_runs(tmp_path):
  config = config_lib.load_config_file('configs/study.py:tiny')
  for field, value, message in (
      ('methods', 'head,tpa,nope', r"names 'nope': accepted methods are \('head', 'full'"),
      ('methods', 'tpa_top9', r'k must be in \[1, 2\]'),
      ('tasks', 'synthetic_speech/klingon', r"accepted synthetic_speech domains .*'lang_id_tiny'"),
      ('tasks', 'mnist', r'accepted tasks are synthetic_speech/<domain>'),
      ('tasks', 'synthetic_speech/lang_id_tiny:regression', r"one of \('ctc', 'classification'\)"),
      ('learning_rates', '3e-3,-1', r'list of positive numbers')):
    c = config_lib.load_config_file('configs/study.py:tiny')
    c.study[field] = value
    with pytest.raises(ConfigError, match=message):
      runner.validate(c)
  # An unknown variant: the error lists the file's variants (every one of which loads).
  spec = importlib.util.spec_from_file_location('study_variants', 'configs/study.py')
  variants = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(variants)
  assert {'quick', 'full', 'real', 'tiny'} <= set(variants.VARIANTS)
  with pytest.raises(ValueError, match=f'one of {re.escape(str(variants.VARIANTS))}, got .huge.'):
    config_lib.load_config_file('configs/study.py:huge')
  for name in variants.VARIANTS:
    assert config_lib.load_config_file(f'configs/study.py:{name}').study.methods
  # The program: one message, status 1, nothing written.
  result = study(str(tmp_path / 's'), '--config.study.methods=head,nope')
  assert result.returncode == 1 and "accepted methods are ('head'" in result.stderr
  assert not os.path.exists(tmp_path / 's' / 'cells')

  # A workdir holding a study of another config: refused, the differing fields named.
  runner.check_workdir(config, str(tmp_path / 'w'))
  changed = config_lib.load_config_file('configs/study.py:tiny')
  changed.study.num_steps = 99
  changed.optim.b2 = 0.9
  with pytest.raises(UserError, match=r'another config: optim.b2: workdir 0.98, config 0.9; '
                                      r'study.num_steps: workdir 12, config 99'):
    runner.check_workdir(changed, str(tmp_path / 'w'))
  changed = config_lib.load_config_file('configs/study.py:tiny')
  changed.study.methods = 'tpa'  # running fewer methods (or more) is the same study
  changed.study.learning_rates = '1e-3,3e-3'  # a wider grid adds runs at the new rates
  runner.check_workdir(changed, str(tmp_path / 'w'))


@pytest.mark.slow(seconds=24)
def test_a_failed_cell_is_recorded_and_the_study_goes_on(tiny_study, tmp_path):
  workdir, _ = tiny_study
  other = str(tmp_path / 'failing')
  result = study(other, f'--config.study.base_workdir={workdir}',
                 f'--config.data.data_dir={os.path.join(workdir, "data")}',
                 '--config.study.learning_rates=inf', '--config.study.methods=tpa,head',
                 '--config.study.tasks=synthetic_speech/target_lang_tiny')
  assert result.returncode == 0, result.stderr[-4000:]
  rows = json.load(open(os.path.join(other, 'study.json')))
  assert [r['method'] for r in rows] == ['tpa', 'head']  # the second ran after the first failed
  assert all(r['status'].startswith('FloatingPointError: non-finite loss') for r in rows)
  assert '**1 failed**' in open(os.path.join(other, 'study.md')).read()


def test_learning_rates_share_one_program_and_the_schedule_is_kept(mesh1):
  """The peak rate is optimizer state: a learning-rate grid compiles one program, and the step
  reports the configured schedule."""
  def lowered(rate):
    config = tiny_config('tpa', **{'optim.learning_rate': rate, 'optim.warmup_steps': 2})
    trainer = trainer_lib.from_config(config, mesh1)
    batch = random_task.random_batch(config, np.random.default_rng(0), 4)
    return trainer, batch, trainer.lower(batch).as_text()
  trainer, batch, text = lowered(3e-3)
  assert lowered(1e-2)[2] == text
  rates = [float(trainer.step(batch)['learning_rate']) for _ in range(3)]
  np.testing.assert_allclose(rates, [0.0, 1.5e-3, 3e-3], rtol=1e-6)


def test_the_demo_base_cache_key_covers_only_what_determines_the_base():
  class Tokenizer:
    def serialize(self):
      return b'abc'

  def key(**overrides):
    c = config_lib.load_config_file('configs/demo.py')
    for path, value in overrides.items():
      *parents, leaf = path.split('.')
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
    stage = demo.stage_config(c, c.demo.pretrain, dataset=c.demo.source, vocab_size=30)
    return cache_keys.base_cache_key(stage, Tokenizer(), dataset_description='source 1.1.0')
  base = key()
  for same in ({'demo.adapt.method': 'head'}, {'demo.adapt.num_steps': 9},
               {'decoding.beta': 0.0}, {'train.log_every_steps': 1},
               {'data.eval_batch_size': 3}, {'checkpoint.keep': 9}):
    assert key(**same) == base, same
  for other in ({'model.dim': 96}, {'demo.pretrain.num_steps': 10},
                {'demo.pretrain.learning_rate': 1e-3}, {'seed': 1},
                {'data.batch_seconds': 8.0}, {'features.num_mels': 64}):
    assert key(**other) != base, other


def test_workers_take_each_cell_once_and_wait_for_the_grids_of_others(tmp_path):
  """The queue of several workers: the costliest methods first, a cell claimed by one worker
  is not taken by another, and a cell whose rate waits on a grid another worker trains waits
  (then runs at the rate its grid chose); without any worker left on that grid, it is skipped."""
  config = config_lib.load_config_file('configs/study.py:tiny')
  config.study.methods = 'head,full,tpa'
  config.study.learning_rates = '3e-3,1e-2'
  s = runner.Study(config, str(tmp_path))
  plan = [c for c, _ in s.plan()]
  # full first, head last; each method's grid (first task, both rates) before its other cells.
  assert [c.method for c in plan] == ['full'] * 3 + ['tpa'] * 3 + ['head'] * 3
  assert [c.learning_rate for c in plan[:3]] == [3e-3, 1e-2, None]
  claims = str(tmp_path / 'claims')
  os.makedirs(claims)
  mine, theirs = list(plan), list(plan)
  # Worker A takes full's two grid cells; worker B, finding them claimed, takes TPA's grid.
  first, second = s._next(mine, claims), s._next(mine, claims)
  assert (first.method, first.learning_rate, second.learning_rate) == ('full', 3e-3, 1e-2)
  got = s._next(theirs, claims)
  assert (got.method, got.learning_rate) == ('tpa', 3e-3)
  assert not any(c.method == 'full' and c.learning_rate for c in theirs)  # dropped: claimed
  # B's full cell on the second task waits (A trains full's grid), as do its TPA and head
  # cells there (B's own grids, still running): B takes the other grid cells, then nothing.
  taken = [s._next(theirs, claims) for _ in range(3)]
  assert [(c.method, c.learning_rate) for c in taken] == [('tpa', 1e-2), ('head', 3e-3),
                                                          ('head', 1e-2)]
  assert s._next(theirs, claims) is None
  assert [(c.task.short, c.method) for c in theirs] == [
      ('lang_id_tiny', 'full'), ('lang_id_tiny', 'tpa'), ('lang_id_tiny', 'head')]
  # A's grid ends (1e-2 validates best): B's waiting full cell runs at that rate.
  for rate, wer in ((3e-3, 0.5), (1e-2, 0.4)):
    cell = cells_lib.Cell(plan[0].task, 'full', rate, 0)
    os.makedirs(s.folder(cell))
    with open(os.path.join(s.folder(cell), 'trained.json'), 'w') as f:
      json.dump({'status': 'ok', 'validation': wer}, f)
  got = s._next(theirs, claims)
  assert (got.task.short, got.method, got.learning_rate) == ('lang_id_tiny', 'full', 1e-2)
  # One process given a cell whose grid is neither done nor selected: skipped, not waited for.
  alone = [c for c in plan if c.method == 'tpa' and c.learning_rate is None]
  assert s._next(alone, '') is None and alone == []


@pytest.mark.slow(seconds=131)
def test_the_scale_variant_compares_bases_of_several_sizes(tmp_path):
  """A base per size, each pre-trained once and cached in its folder, one corpus for all; the
  table has TPA's gap to full fine-tuning per base."""
  workdir = str(tmp_path / 'scale')
  result = study(workdir, '--config.study.scale_models=demo,wide',
                 '--config.study.methods=full,tpa',
                 '--config.study.tasks=synthetic_speech/target_lang_tiny',
                 '--config.study.eval_every_steps=12')  # one validation per run (test time)
  assert result.returncode == 0, result.stderr[-4000:]
  rows = json.load(open(os.path.join(workdir, 'study.json')))
  assert sorted((r['base'], r['method']) for r in rows) == [
      ('demo', 'full'), ('demo', 'tpa'), ('wide', 'full'), ('wide', 'tpa')]
  assert all(r['status'] == 'ok' for r in rows)
  size = {r['base']: r['total_params'] for r in rows if r['method'] == 'full'}
  assert size['wide'] > 5 * size['demo']
  for name in ('demo', 'wide'):
    assert os.path.exists(os.path.join(workdir, name, 'base', 'encoder')), name
  assert os.path.isdir(os.path.join(workdir, 'data'))  # one corpus, not one per base
  assert not any(os.path.exists(os.path.join(workdir, n, 'data')) for n in ('demo', 'wide'))
  table = open(os.path.join(workdir, 'study.md')).read()
  assert len(re.findall(r'^\| (demo|wide) \| [\d,]+ \| [\d.]+ \| target_lang_tiny \|.*% '
                        r'relative \|$', table, flags=re.M)) == 2
  assert all(r['base_pretrain_loss'] > 0 for r in rows)


@pytest.mark.slow(seconds=63)
def test_the_top_k_and_bottleneck_curves(tiny_study, tmp_path):
  """The full variant's curves: TPA on the top k blocks and with bottleneck r, in study.md
  (k = every block and the study's own r being `tpa`) and in the plots."""
  workdir, _ = tiny_study
  other = str(tmp_path / 'curves')
  result = study(other, f'--config.study.base_workdir={workdir}',
                 f'--config.data.data_dir={os.path.join(workdir, "data")}',
                 '--config.study.tasks=synthetic_speech/target_lang_tiny',
                 '--config.study.methods=tpa,tpa_top1,tpa_r4')
  assert result.returncode == 0, result.stderr[-4000:]
  test = {r['method']: r['test'] for r in json.load(open(os.path.join(other, 'study.json')))}
  table = open(os.path.join(other, 'study.md')).read()
  as_cell = lambda x: f'{100 * x:.1f} ± 0.0'  # pylint: disable=unnecessary-lambda-assignment
  assert (f"| k=1 | k=2 |\n|---|---|---|\n| target_lang_tiny | {as_cell(test['tpa_top1'])} | "
          f"{as_cell(test['tpa'])} |") in table
  assert (f"| r=4 | r=8 |\n|---|---|---|\n| target_lang_tiny | {as_cell(test['tpa_r4'])} | "
          f"{as_cell(test['tpa'])} |") in table
  for name in ('pruning.png', 'bottleneck.png'):
    assert os.path.exists(os.path.join(other, name)), name


@pytest.mark.slow(seconds=47)
def test_a_study_on_a_domain_of_a_users_file_beside_a_manifest_task(tmp_path):
  """A user's domains file adds to the built-in domains (it holds the tiny ones and a new one:
  the base still pre-trains on source_tiny), and a manifest task runs in the same study."""
  with open(config_lib.TINY_DOMAINS_FILE) as f:
    tiny = json.load(f)
  mine = dict(tiny['target_lang_tiny'], description='a domain of my own', seed=7)
  domains_file = tmp_path / 'domains.json'
  domains_file.write_text(json.dumps({**tiny, 'my_domain_tiny': mine}))
  import soundfile  # pylint: disable=import-outside-toplevel
  recordings = tmp_path / 'recorded'
  recordings.mkdir()
  rng = np.random.default_rng(0)
  lines = {'train': [], 'validation': [], 'test': []}
  for i in range(24):
    split = 'train' if i < 16 else 'validation' if i < 20 else 'test'
    soundfile.write(recordings / f'u{i}.wav', 0.1 * rng.standard_normal(12000), 24000)
    lines[split].append(json.dumps({'audio_filepath': f'u{i}.wav',
                                    'text': ' '.join(['ab', 'ba', 'abba'][j % 3]
                                                     for j in range(i % 3 + 1))}))
  for split, items in lines.items():
    (recordings / f'{split}.jsonl').write_text('\n'.join(items) + '\n')
  workdir = tmp_path / 'study'
  result = study(str(workdir), f'--config.data.domains_file={domains_file}',
                 f'--config.study.tasks=synthetic_speech/my_domain_tiny,manifest:{recordings}',
                 '--config.study.methods=head', '--config.study.pruning_seeds=0')
  assert result.returncode == 0, result.stderr[-4000:]
  rows = rows_of(workdir)
  assert {(r['task'], r['status']) for r in rows} == {
      ('synthetic_speech/my_domain_tiny', 'ok'), (f'manifest:{recordings}', 'ok')}
  assert all(r['metric'] == 'wer' for r in rows)


def test_a_users_domain_named_like_a_built_in_one_must_be_identical(tmp_path):
  from tpa_jax.data import speech_corpus  # pylint: disable=import-outside-toplevel
  with open(config_lib.DOMAINS_FILE) as f:
    built_in = json.load(f)
  same = tmp_path / 'same.json'
  same.write_text(json.dumps({**built_in, 'mine': built_in['target_lang']}))
  domains = speech_corpus.all_domains(str(same))
  assert set(domains) == set(built_in) | {'mine'}
  assert domains['source'] is speech_corpus.all_domains()['source']  # the built-in config
  changed = tmp_path / 'changed.json'
  changed.write_text(json.dumps({'source': {**built_in['source'], 'seed': 5}}))
  with pytest.raises(ConfigError, match=r"redefines the built-in domain 'source' \(seed: "
                                        r"built in 0, file 5\)"):
    speech_corpus.all_domains(str(changed))
