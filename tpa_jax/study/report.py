"""The study's report from its rows: `study.md` (the paper-style table: methods x tasks, mean ±
std over seeds, trainable share; failed cells marked) and plots (quality against trainable
parameters per task, the pruning curves, the bottleneck curve)."""

from __future__ import annotations

import os
import re
import statistics

import ml_collections

from tpa_jax.study import base as base_lib


def _percent(x: float) -> str:
  return f'{100 * x:.1f}'


def summarize(rows: list[dict]) -> dict:
  """(task, method) -> {'mean', 'std', 'n', 'failed', 'best_path', ...} over seeds."""
  out = {}
  for row in rows:
    key = (row['task'], row['method'])
    cell = out.setdefault(key, {'tests': [], 'best_path': [], 'failed': [], 'row': row})
    if row['status'] == 'ok' and row.get('test') is not None:
      cell['tests'].append(row['test'])
      if row.get('best_path_test') is not None:
        cell['best_path'].append(row['best_path_test'])
    else:
      cell['failed'].append(f"seed {row['seed']}: {row['status']}")
  for cell in out.values():
    t = cell['tests']
    cell['n'] = len(t)
    cell['mean'] = statistics.fmean(t) if t else None
    cell['std'] = statistics.stdev(t) if len(t) > 1 else 0.0 if t else None
    cell['best_path_mean'] = statistics.fmean(cell['best_path']) if cell['best_path'] else None
  return out


def table(rows: list[dict], config: ml_collections.ConfigDict | None = None) -> str:
  """Markdown: one row per method, one column per task (test WER % or accuracy %, mean ± std
  over seeds), the trainable share and the step FLOPs against full fine-tuning."""
  summary = summarize(rows)
  tasks = list(dict.fromkeys(r['task'] for r in rows))
  methods = list(dict.fromkeys(r['method'] for r in rows))
  metric = {r['task']: r['metric'] for r in rows}
  head = ['method', f"trainable ({tasks[0].split('/')[-1]})", 'step FLOPs vs full'] + [
      f"{t.split('/')[-1]} ({'WER %, lower' if metric[t] == 'wer' else 'accuracy %, higher'} "
      'is better)' for t in tasks]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for method in methods:
    mine = [r for r in rows if r['method'] == method]
    any_row = next((r for r in mine if r['task'] == tasks[0]), mine[0])
    share = any_row.get('trainable_fraction')
    flops = any_row.get('step_flops_vs_full')
    cells = [method,
             f"{any_row['trainable_params']:,} ({100 * share:.2f}%)" if share is not None else '-',
             f'{flops:.2f}' if flops is not None else '-']
    for task in tasks:
      s = summary.get((task, method))
      if s is None:
        cells.append('not run')
        continue
      text = (f"{_percent(s['mean'])} ± {_percent(s['std'])}" if s['mean'] is not None
              else 'failed')
      if s['best_path_mean'] is not None:
        text += f" ({_percent(s['best_path_mean'])})"
      if s['failed']:
        text += f" **{len(s['failed'])} failed**"
      cells.append(text)
    lines.append('| ' + ' | '.join(cells) + ' |')
  notes = []
  for (task, method), s in summary.items():
    for failure in s['failed']:
      notes.append(f'- {task} / {method}, {failure}')
  n_seeds = max((s['n'] for s in summary.values()), default=0)
  text = [
      '# Study', '',
      f'Test scores at each run\'s best validation step, mean ± standard deviation over '
      f'{n_seeds} seed(s); the learning rate of each method and task was chosen on the '
      'validation split. ASR cells give the lexicon-decoded WER and, in brackets, the '
      'best-path WER.', '', *lines, '']
  rates = {}
  for r in rows:
    rates.setdefault(r['method'], {})[r['task'].split('/')[-1]] = r['learning_rate']
  text += ['Chosen learning rates: ' + '; '.join(
      f'{m}: ' + ', '.join(f'{t} {lr:g}' for t, lr in v.items()) for m, v in rates.items()), '']
  if notes:
    text += ['Failed cells:', *notes, '']
  pruning = pruning_table(rows)
  if pruning:
    text += pruning
  text += curve_tables(summary, tasks, config)
  return '\n'.join(text)


def curve_tables(summary: dict, tasks: list[str], config=None) -> list[str]:
  """TPA trained on the top k blocks (`tpa_top<k>`; k = every block is `tpa`), and TPA with
  bottleneck r (`tpa_r<r>`; the study's own r is `tpa`): test, mean ± std over seeds."""
  out = []
  for title, pattern, field, full_value in (
      ('TPA trained on the top k blocks only', r'tpa_top(\d+)', 'k',
       config.model.num_blocks if config is not None else None),
      ('TPA with bottleneck r', r'tpa_r(\d+)', 'r',
       config.study.bottleneck if config is not None else None)):
    points = {}
    for (task, name), s in summary.items():
      m = re.fullmatch(pattern, name)
      value = int(m.group(1)) if m else (full_value if name == 'tpa' else None)
      if value is not None and s['mean'] is not None:
        points.setdefault(task, {})[value] = s
    if not any(len(p) > 1 for p in points.values()):
      continue
    values = sorted({v for p in points.values() for v in p})
    out += [f'{title} (test, mean ± std over seeds):', '',
            '| task | ' + ' | '.join(f'{field}={v}' for v in values) + ' |',
            '|---|' + '---|' * len(values)]
    for task in tasks:
      if task in points:
        out.append(f"| {task.split('/')[-1]} | " + ' | '.join(
            f"{_percent(points[task][v]['mean'])} ± {_percent(points[task][v]['std'])}"
            if v in points[task] else '-' for v in values) + ' |')
    out.append('')
  return out


def _curves(rows: list[dict], key: str, field: str) -> dict:
  """task -> {k: [test score per seed]} of a pruning curve (`key` of the rows)."""
  curves = {}
  for r in rows:
    for point in r.get(key) or ():
      curves.setdefault(r['task'], {}).setdefault(point[field], []).append(point['test'])
  return curves


def pruning_table(rows: list[dict]) -> list[str]:
  """TPA's test score with adapters removed from the lowest (and highest) k blocks, without
  retraining, mean over seeds."""
  lowest = _curves(rows, 'pruning', 'removed_lowest')
  highest = _curves(rows, 'pruning_from_top', 'removed_highest')
  if not lowest:
    return []
  ks = sorted({k for c in lowest.values() for k in c})
  lines = ['TPA trained on every block, then its adapters removed from the lowest (or the '
           'highest) k blocks, without retraining (test, mean over seeds):', '',
           '| task | removed from | ' + ' | '.join(f'k={k}' for k in ks) + ' |',
           '|---|---|' + '---|' * len(ks)]
  for name, curves in (('lowest', lowest), ('highest', highest)):
    for task, curve in curves.items():
      lines.append(f"| {task.split('/')[-1]} | {name} | " + ' | '.join(
          _percent(statistics.fmean(curve[k])) if k in curve else '-' for k in ks) + ' |')
  return lines + ['']


def write(rows: list[dict], workdir: str, config=None) -> None:
  """Writes `study.md` and the plots into `workdir`."""
  with open(os.path.join(workdir, 'study.md'), 'w') as f:
    f.write(table(rows, config) if rows else '# Study\n\nNo finished cell yet.\n')
  if rows:
    plots(rows, workdir)


def plots(rows: list[dict], workdir: str) -> None:
  """pareto.png (test against trainable parameters, per task), pruning.png (trained on the top
  k blocks; adapters removed from the lowest k), bottleneck.png (TPA's r)."""
  # Imported here: matplotlib loads in about a second, and only the plots need it.
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  summary = summarize(rows)
  tasks = list(dict.fromkeys(r['task'] for r in rows))
  metric = {r['task']: r['metric'] for r in rows}
  params = {(r['task'], r['method']): r['trainable_params'] for r in rows
            if r.get('trainable_params')}

  def ylabel(task):
    return 'test WER %' if metric[task] == 'wer' else 'test accuracy %'

  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for (t, method), s in summary.items():
      if t != task or s['mean'] is None or (t, method) not in params:
        continue
      n = params[(t, method)]
      ax.errorbar(n, 100 * s['mean'], yerr=100 * s['std'], fmt='o', capsize=3)
      ax.annotate(method, (n, 100 * s['mean']), fontsize=7, xytext=(3, 3),
                  textcoords='offset points')
    ax.set(title=task.split('/')[-1], xlabel='trainable parameters', ylabel=ylabel(task),
           xscale='log')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'pareto.png'), dpi=100)
  plt.close(fig)

  top = {(t, int(m.group(1))): s for (t, name), s in summary.items()
         if (m := re.fullmatch(r'tpa_top(\d+)', name)) and s['mean'] is not None}
  removed = _curves(rows, 'pruning', 'removed_lowest')
  removed_top = _curves(rows, 'pruning_from_top', 'removed_highest')
  if top or removed:
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
      pts = sorted((k, s['mean']) for (t, k), s in top.items() if t == task)
      if pts:
        ax.plot([k for k, _ in pts], [100 * v for _, v in pts], 'o-',
                label='trained on the top k blocks')
      if task in removed:
        num = max(removed[task])
        pts = sorted((num - k, statistics.fmean(v)) for k, v in removed[task].items())
        ax.plot([k for k, _ in pts], [100 * v for _, v in pts], 's--',
                label='trained on all; kept on the top k (removed from the lowest)')
      if task in removed_top:
        num = max(removed_top[task])
        pts = sorted((num - k, statistics.fmean(v)) for k, v in removed_top[task].items())
        ax.plot([k for k, _ in pts], [100 * v for _, v in pts], '^:',
                label='trained on all; kept on the lowest k (removed from the top)')
      ax.set(title=task.split('/')[-1], xlabel='k: blocks that keep adapters',
             ylabel=ylabel(task))
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'pruning.png'), dpi=100)
    plt.close(fig)

  bottleneck = {(t, int(m.group(1))): s for (t, name), s in summary.items()
                if (m := re.fullmatch(r'tpa_r(\d+)', name)) and s['mean'] is not None}
  if bottleneck:
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
      pts = sorted((r, s['mean'], s['std']) for (t, r), s in bottleneck.items() if t == task)
      if pts:
        ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts],
                    yerr=[100 * p[2] for p in pts], fmt='o-', capsize=3)
      ax.set(title=task.split('/')[-1], xlabel='TPA bottleneck r', ylabel=ylabel(task),
             xscale='log', xticks=[p[0] for p in pts] if pts else [])
      ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'bottleneck.png'), dpi=100)
    plt.close(fig)


def _score_with_rate(s: dict | None) -> str:
  """'mean ± std (best-path mean) [rate]' of a summarized cell, or '-'."""
  if not s or s['mean'] is None:
    return '-'
  text = f"{_percent(s['mean'])} ± {_percent(s['std'])}"
  if s['best_path_mean'] is not None:
    text += f" ({_percent(s['best_path_mean'])})"
  return f"{text} [{s['row']['learning_rate']:g}]"


def _difference(s: dict | None, reference: dict | None, metric: str, suffix: str) -> str | None:
  """How `s` differs from `reference`: relative for WER, absolute points for accuracy."""
  if not s or not reference or s['mean'] is None or reference['mean'] is None:
    return None
  if metric == 'wer':
    return f"{100 * (s['mean'] / reference['mean'] - 1):+.0f}%{suffix}"
  return f"{100 * (s['mean'] - reference['mean']):+.1f} points{suffix}"


def scale_table(rows: list[dict]) -> str:
  """Markdown: per base size and task, each method's test score (mean ± std over seeds; ASR:
  the best-path WER in brackets) and chosen learning rate, TPA's trainable share, and the gap
  between TPA and full fine-tuning (relative for WER, absolute points for accuracy)."""
  methods = ('head', 'full', 'tpa')
  lines = ['# Study over bases of several sizes', '',
           'Test scores at each run\'s best validation step (ASR: lexicon WER %, best-path WER '
           'in brackets; language ID: accuracy %), mean ± standard deviation over seeds, at '
           'each method\'s learning rate chosen on validation [in square brackets]. Base '
           'parameters: the frozen encoder\'s; pre-training loss: its mean training loss '
           'over the last tenth of its pre-training steps.',
           '', '| base | base parameters | pre-training loss | task | ' + ' | '.join(methods) +
           ' | TPA trainable | TPA vs full |', '|---|---|---|---|---|---|---|---|---|']
  bases = list(dict.fromkeys(r['base'] for r in rows))
  for base in bases:
    sub = [r for r in rows if r['base'] == base]
    summary = summarize(sub)
    params = next((r['total_params'] - r['trainable_params'] for r in sub
                   if r['method'] == 'tpa' and r.get('total_params')), None)
    for task in dict.fromkeys(r['task'] for r in sub):
      metric = next(r['metric'] for r in sub if r['task'] == task)
      cells = []
      for method in methods:
        cells.append(_score_with_rate(summary.get((task, method))))
      full, tpa = summary.get((task, 'full')), summary.get((task, 'tpa'))
      gap = _difference(tpa, full, metric, ' relative' if metric == 'wer' else '') or '-'
      share = '-'
      if tpa and tpa['row'].get('trainable_fraction') is not None:
        share = f"{100 * tpa['row']['trainable_fraction']:.2f}%"
      frozen = f'{params:,}' if params else '-'
      loss = sub[0].get('base_pretrain_loss')
      loss = f'{loss:.3f}' if loss is not None else '-'
      lines.append(f"| {base} | {frozen} | {loss} | {task.split('/')[-1]} | " +
                   ' | '.join(cells) +
                   f' | {share} | {gap} |')
  return '\n'.join(lines) + '\n'


_BASE_DESCRIPTIONS = {
    'supervised': "CTC on the source domain's transcripts",
    'best_rq': 'BEST-RQ on the same audio, no transcripts',
    'random': 'the same architecture, never trained',
}


def _describe_base(name: str) -> str:
  keep = base_lib.kept_blocks(name)
  if keep is not None:
    return f"best_rq's frontend and lowest {keep} blocks under random's blocks above them"
  return _BASE_DESCRIPTIONS.get(name, name)


def base_table(rows: list[dict]) -> str:
  """Markdown: per base (how it was pre-trained) and method, each task's test score (mean ± std
  over seeds; ASR: the best-path WER in brackets) at its chosen learning rate, and, per task,
  how far each base is from the random one (relative for WER, absolute points for accuracy)."""
  tasks = list(dict.fromkeys(r['task'] for r in rows))
  metric = {r['task']: r['metric'] for r in rows}
  bases = '; '.join(f'{b} ({_describe_base(b)})' for b in dict.fromkeys(r['base'] for r in rows))
  lines = ['# Study over bases pre-trained differently', '',
           'Test scores at each run\'s best validation step (ASR: lexicon WER %, best-path WER '
           'in brackets; language ID: accuracy %), mean ± standard deviation over seeds, at '
           f'each learning rate chosen on validation [in square brackets]. Bases: {bases}. In '
           'parentheses after each score: its difference from the random base.', '',
           '| base | method | ' + ' | '.join(t.split('/')[-1] for t in tasks) + ' |',
           '|---|---|' + '---|' * len(tasks)]
  summary = {base: summarize([r for r in rows if r['base'] == base])
             for base in dict.fromkeys(r['base'] for r in rows)}
  methods = list(dict.fromkeys(r['method'] for r in rows))
  for base, sub in summary.items():
    for method in methods:
      cells = []
      for task in tasks:
        s, floor = sub.get((task, method)), summary.get('random', {}).get((task, method))
        text = _score_with_rate(s)
        gap = _difference(s, floor, metric[task], ' vs random') if base != 'random' else None
        cells.append(f'{text} ({gap})' if gap else text)
      lines.append(f'| {base} | {method} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
