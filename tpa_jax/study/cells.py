"""What a study runs: its tasks, its methods (rows), its cells, and the run config of each.

A cell is one task x method x seed at one learning rate: an ordinary training run in its own
folder, `<workdir>/cells/<task>/<method>/lr=<lr>/seed=<seed>`. Names are checked before anything
runs, and every refusal lists the accepted names.
"""

from __future__ import annotations

import dataclasses
import os
import re

import ml_collections

from tpa_jax import config as config_lib
from tpa_jax.data import manifest, speech_corpus
from tpa_jax.errors import ConfigError

# Methods by name: the config.METHODS entry they train, and what they change. `tpa_top<k>`
# (TPA on the top k blocks) and `tpa_r<r>` (TPA with bottleneck r) are families.
FIXED_METHODS = {
    'head': dict(method='head'),
    'full': dict(method='full'),
    'tpa': dict(method='tpa'),
    'ff_sequential': dict(method='ff_sequential'),
    'block_parallel': dict(method='block_parallel'),
    'block_sequential': dict(method='block_sequential'),
    # The serial adapter at twice TPA's bottleneck: one adapter per block instead of TPA's two,
    # so the same trainable parameters.
    'block_sequential_x2': dict(method='block_sequential', bottleneck_scale=2),
    'mhsa_parallel': dict(method='mhsa_parallel'),
    'conv_parallel': dict(method='conv_parallel'),
    'lora': dict(method='lora'),
    'tpa_upper_half': dict(method='tpa', blocks='upper_half'),
    'tpa_upper_quarter': dict(method='tpa', blocks='upper_quarter'),
    'tpa_lower_half': dict(method='tpa', blocks='lower_half'),
}
FAMILIES = ('tpa_top<k> (TPA on the top k blocks)', 'tpa_r<r> (TPA with bottleneck r)')
HEADS = ('ctc', 'classification')


def method_names_help() -> str:
  return f'{tuple(FIXED_METHODS)} and the families {FAMILIES}'


def method_overrides(name: str, study: ml_collections.ConfigDict, num_blocks: int) -> dict:
  """{config field: value} that method `name` sets on a run config."""
  m = re.fullmatch(r'tpa_top(\d+)', name)
  if m:
    k = int(m.group(1))
    if not 1 <= k <= num_blocks:
      raise ConfigError(f'study method {name!r}: k must be in [1, {num_blocks}] for a model of '
                        f'{num_blocks} blocks')
    spec = dict(method='tpa', blocks=f'{num_blocks - k}:')
  elif re.fullmatch(r'tpa_r(\d+)', name):
    spec = dict(method='tpa', bottleneck=int(name[5:]))
    if spec['bottleneck'] < 1:
      raise ConfigError(f'study method {name!r}: the bottleneck must be >= 1')
  elif name in FIXED_METHODS:
    spec = dict(FIXED_METHODS[name])
  else:
    raise ConfigError(f'study.methods names {name!r}: accepted methods are '
                      f'{method_names_help()}')
  method = spec['method']
  out = {'adapter.placement': config_lib.METHODS[method]['placement'],
         'train.trainable': config_lib.METHODS[method]['trainable']}
  if out['adapter.placement'] == 'lora':
    out['adapter.bottleneck'] = int(study.lora_rank)
    out['adapter.lora_alpha'] = float(study.lora_alpha)
  elif out['adapter.placement'] != 'none':
    out['adapter.bottleneck'] = int(spec.get('bottleneck', study.bottleneck)
                                    * spec.get('bottleneck_scale', 1))
  blocks = spec.get('blocks', 'all')
  half, quarter = num_blocks // 2, max(num_blocks // 4, 1)
  blocks = {'upper_half': f'{num_blocks - half}:', 'upper_quarter': f'{num_blocks - quarter}:',
            'lower_half': f':{half}'}.get(blocks, blocks)
  if out['adapter.placement'] != 'none':
    out['adapter.blocks'] = blocks
  return out


@dataclasses.dataclass(frozen=True)
class Task:
  """A dataset and the head trained on it."""
  name: str  # the dataset, as data.name takes it
  head: str  # 'ctc' or 'classification'

  @property
  def short(self) -> str:
    if self.name.startswith('manifest:'):  # the manifest folder's name
      return os.path.basename(os.path.normpath(self.name[len('manifest:'):]))
    return self.name.split('/')[-1]

  @property
  def metric(self) -> str:
    return 'wer' if self.head == 'ctc' else 'accuracy'


def split_list(value) -> list[str]:
  """'a,b' or ('a', 'b') -> ['a', 'b']."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(',') if v.strip()]
  return [str(v).strip() for v in value]


def parse_tasks(config: ml_collections.ConfigDict) -> list[Task]:
  """study.tasks: dataset names, each with an optional ':ctc' or ':classification'. Without one,
  a synthetic domain of several languages is language ID (classification), anything else ASR."""
  domains_file = config.data.domains_file
  domains = speech_corpus.all_domains(domains_file)
  domains_file = domains_file or 'the built-in domains'
  tasks = []
  for entry in split_list(config.study.tasks):
    if entry.startswith('manifest:'):
      tasks.append(_manifest_task(entry))
      continue
    name, _, head = entry.partition(':')
    family, _, domain = name.partition('/')
    if family == 'synthetic_speech':
      if domain not in domains:
        raise ConfigError(f'study.tasks names {name!r}: accepted synthetic_speech domains (of '
                          f'{domains_file}) are {tuple(domains)}, or librispeech')
      head = head or ('classification' if len(domains[domain].languages) > 1 else 'ctc')
    elif name == 'librispeech':
      head = head or 'ctc'
    else:
      raise ConfigError(f'study.tasks names {name!r}: accepted tasks are '
                        f'synthetic_speech/<domain> (of {domains_file}: {tuple(domains)}), '
                        "librispeech and manifest:DIR, each optionally with ':ctc' or "
                        "':classification'")
    if head not in HEADS:
      raise ConfigError(f'study.tasks entry {entry!r}: the head after ":" must be one of {HEADS}')
    tasks.append(Task(name, head))
  if not tasks:
    raise ConfigError('study.tasks names no task')
  return tasks


def _manifest_task(entry: str) -> Task:
  """'manifest:DIR[:ctc|:classification]': the head defaults to what the train manifest's
  lines carry (text: ctc, labels: classification)."""
  name, head = entry, ''
  for kind in HEADS:
    if entry.endswith(f':{kind}'):
      name, head = entry[:-len(kind) - 1], kind
  kind = manifest.manifest_task(manifest.read_manifests(manifest.manifest_dir(name)))
  if head and head != kind:
    raise ConfigError(f'study.tasks entry {entry!r}: {name} is a {kind} manifest')
  return Task(name, kind)


def learning_rates(config: ml_collections.ConfigDict) -> list[float]:
  try:
    rates = [float(v) for v in split_list(config.study.learning_rates)]
  except ValueError as e:
    raise ConfigError(f'study.learning_rates={config.study.learning_rates!r}: a comma-separated '
                      'list of positive numbers') from e
  if not rates or any(r <= 0 for r in rates):
    raise ConfigError(f'study.learning_rates={config.study.learning_rates!r}: a comma-separated '
                      'list of positive numbers')
  return rates


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run: a task, a method, a learning rate and a seed."""
  task: Task
  method: str
  learning_rate: float
  seed: int

  @property
  def folder(self) -> str:
    return os.path.join('cells', self.task.short, self.method,
                        f'lr={self.learning_rate:g}', f'seed={self.seed}')

  @property
  def name(self) -> str:
    return f'{self.task.short}/{self.method}/lr={self.learning_rate:g}/seed={self.seed}'


def run_config(config: ml_collections.ConfigDict, cell: Cell, *, base_path: str,
               data_dir: str, tokenizer_dir: str) -> ml_collections.ConfigDict:
  """The ordinary run config of `cell`: the study's shared fields (model, features, data,
  decoding, steps, schedule), the cell's task, method, learning rate and seed. Every cell of a
  task sees the same data order for a seed, the same steps and the same schedule."""
  s = config.study
  c = ml_collections.ConfigDict(config.to_dict())
  del c['study']
  for section in ('demo', 'ssl', 'ssl_pretrain'):  # how bases are pre-trained, not the cell
    if section in c:
      del c[section]
  c.seed = cell.seed
  c.base.path = base_path
  c.data.name = cell.task.name
  c.data.data_dir = data_dir
  c.tokenizer.dir = tokenizer_dir
  c.head.kind = cell.task.head
  for key, value in method_overrides(cell.method, s, c.model.num_blocks).items():
    section, field = key.split('.')
    c[section][field] = value
  c.train.num_steps = int(s.num_steps)
  c.train.eval_every_steps = int(s.eval_every_steps)
  c.checkpoint.every_steps = int(s.eval_every_steps)  # a resumed cell re-runs less than one
  c.checkpoint.keep = 1
  c.optim.learning_rate = cell.learning_rate
  c.optim.warmup_steps = int(s.warmup_steps)
  c.data.eval_split = ''  # test is scored by the study, once, at the chosen learning rate
  return c
