"""`launch/study.py`'s work: one study; or (`study.scale_models`) one per base size and a table
of how the gap between TPA and full fine-tuning moves as the base grows; or (`study.bases`) one
per base pre-trained differently (supervised, BEST-RQ, none) and a table of each method's score
over each base."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from tpa_jax.errors import ConfigError
from tpa_jax.study import base as base_lib
from tpa_jax.study import publish
from tpa_jax.study import report
from tpa_jax.study.runner import Study, validate
from tpa_jax.train.metrics import write_json

# Bases of the scale variant, by name: the demo's shape changed by these fields, each
# pre-trained as the demo's base is (same data, steps and schedule), cached in its own folder.
SCALE_MODELS = {
    'demo': {},  # 6 x 144, 2.9 M parameters
    'wide': dict(dim=192, ffn_dim=768),  # 6 x 192, 5.2 M
    'wider': dict(dim=224, ffn_dim=896),  # 6 x 224, 7.0 M
    'deep': dict(dim=192, ffn_dim=768, num_blocks=8),  # 8 x 192, 6.9 M
}
# Peak pre-training rates other than the demo's 3e-3. At 3e-3, 6 x 224 and 8 x 192 stayed on
# CTC's plateau (training loss 2.5-2.6 at steps 1,500 and 1,950 of 2,300, gradient norms 1-3;
# 6 x 192 was at 1.2 by step 550): the wider base takes half the rate.
SCALE_PRETRAIN_RATES = {'wider': 1.5e-3}


def scale_configs(config: ml_collections.ConfigDict,
                  workdir: str) -> dict[str, ml_collections.ConfigDict]:
  out = {}
  for name in [m.strip() for m in config.study.scale_models.split(',') if m.strip()]:
    if name not in SCALE_MODELS:
      raise ConfigError(f'study.scale_models names {name!r}: accepted models are '
                        f'{tuple(SCALE_MODELS)}')
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.update(SCALE_MODELS[name])
    if name in SCALE_PRETRAIN_RATES:
      c.demo.pretrain.learning_rate = SCALE_PRETRAIN_RATES[name]
    c.study.scale_models = ''
    c.data.data_dir = base_lib.data_dir(config, workdir)  # one corpus serves every shape
    if name != 'demo':
      c.study.base_workdir = ''  # only the demo's own shape is cached by `make demo`
    out[name] = c
  return out


def base_configs(config: ml_collections.ConfigDict,
                 workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """study.bases: one study config per base (the study's own fields otherwise)."""
  base_lib.check(config)
  out = {}
  for name in [b.strip() for b in config.study.bases.split(',') if b.strip()]:
    c = ml_collections.ConfigDict(config.to_dict())
    c.study.base, c.study.bases = name, ''
    c.data.data_dir = base_lib.data_dir(config, workdir)  # one corpus serves every base
    out[name] = c
  return out


def main(config: ml_collections.ConfigDict, workdir: str, *, cells=(),
         report_only: bool = False, argv: list[str] = (), worker: str = '') -> list[dict]:
  """Runs (or, with `report_only`, reports) the study of `config` in `workdir`: in
  `study.workers` processes (this program's `argv` again, with `--worker=CLAIMS_FOLDER`), or here."""
  # Identical programs compile once across cells: seeds and learning rates share programs (the
  # peak rate is optimizer state), and JAX's persistent cache keeps them across processes.
  jax.config.update('jax_compilation_cache_dir', config.study.compile_cache or os.path.join(
      os.path.abspath(workdir), 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if config.study.scale_models and config.study.bases:
    raise ConfigError('study.scale_models and study.bases each run one study per base; set one')
  if report_only or worker:
    return _main(config, workdir, cells, report_only, argv, worker)
  publish.record_start(workdir, list(argv))  # (the command, commit and machine of its figures)
  rows = _main(config, workdir, cells, report_only, argv, worker)
  publish.record_finish(workdir)
  return rows


def _main(config, workdir, cells, report_only, argv, worker) -> list[dict]:
  if not config.study.scale_models and not config.study.bases:
    return _one(config, workdir, cells, report_only, argv, worker)
  if config.study.bases:
    subs, field, table = base_configs(config, workdir), 'bases', report.base_table
  else:
    subs, field, table = scale_configs(config, workdir), 'scale_models', report.scale_table
  for c in subs.values():
    validate(c)  # every name checked before anything runs
  if worker:  # a worker of one base's study: its argv names that base and its folder
    (c,) = subs.values()
    return _one(c, workdir, cells, report_only, argv, worker)
  rows = []
  for name, c in subs.items():
    folder = os.path.join(workdir, name)
    sub_argv = [*argv, f'--config.study.{field}={name}', f'--workdir={folder}',
                f'--config.data.data_dir={c.data.data_dir}']
    sub_rows = _one(c, folder, cells, report_only, sub_argv, '')
    loss = base_pretrain_loss(c, folder)
    rows += [{**row, 'base': name, 'base_pretrain_loss': loss} for row in sub_rows]
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, 'study.json'), rows)
  with open(os.path.join(workdir, 'study.md'), 'w') as f:
    f.write(table(rows))
  return rows


def base_pretrain_loss(config: ml_collections.ConfigDict, workdir: str) -> float | None:
  """The mean training loss over the last tenth of the pre-training of the base that the
  study in `workdir` ran over (how well trained a base is, beside how large); None for a base
  without its training curve (given by `base.path`)."""
  paths = [os.path.join(workdir, 'base', 'encoder.json')]
  if config.study.base_workdir:
    paths.append(os.path.join(config.study.base_workdir, 'base', 'encoder.json'))
  if config.base.path:
    paths = [config.base.path.rstrip('/') + '.json']
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        curve = json.load(f).get('curve') or []
      losses = [p['loss'] for p in curve[-max(len(curve) // 10, 1):] if 'loss' in p]
      return round(sum(losses) / len(losses), 4) if losses else None
  return None


def _one(config, workdir, cells, report_only, argv, worker) -> list[dict]:
  study = Study(config, workdir)
  if report_only:
    return study.write_report()
  if worker:  # one of the launch's worker processes; `worker` is their claims folder
    return study.run(list(cells), claims=worker, report=False)
  if int(config.study.workers) > 1:
    return study.run_workers(list(argv), list(cells))
  return study.run(list(cells))
