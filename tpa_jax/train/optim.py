"""Optimizers over trainable state only: AdamW with warmup + cosine or rsqrt decay, clipping."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpa_jax.errors import ConfigError

SCHEDULES = ('cosine', 'rsqrt', 'constant')


class PeakState(NamedTuple):
  """State of `scale_by_peak_schedule`: the step count and the peak learning rate."""
  count: jax.Array
  peak: jax.Array


class PeakSchedule:
  """lr(step) = peak · unit(step). Inside a train step the peak is read from the optimizer state
  (`in_step`), so runs that differ only in their learning rate run the same compiled program
  (a study's learning-rate grid compiles once); `schedule(step)` is the same value on the host."""

  def __init__(self, unit: optax.Schedule, peak: float):
    self.unit, self.peak = unit, float(peak)

  def __call__(self, step):
    return self.peak * self.unit(step)

  def in_step(self, opt_state, step):
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PeakState))
              if isinstance(s, PeakState)]
    return states[0].peak * self.unit(step)


def scale_by_peak_schedule(unit: optax.Schedule, peak: float) -> optax.GradientTransformation:
  """updates · -(peak · unit(count)), with the peak an array of the state."""
  def init_fn(params):
    del params
    return PeakState(count=jnp.zeros([], jnp.int32), peak=jnp.asarray(peak, jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    step_size = -state.peak * unit(state.count)
    updates = jax.tree.map(lambda u: (step_size * u).astype(u.dtype), updates)
    return updates, PeakState(count=optax.safe_increment(state.count), peak=state.peak)

  return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(*, learning_rate: float, schedule: str, warmup_steps: int, decay_steps: int,
                  end_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `end_ratio`·lr at `decay_steps`,
  rsqrt decay lr·sqrt(warmup/step), or a constant."""
  if schedule not in SCHEDULES:
    raise ConfigError(f'optim.schedule={schedule!r}: accepted values are {SCHEDULES}')
  if learning_rate <= 0:
    raise ConfigError(f'optim.learning_rate={learning_rate}: must be positive')
  warmup_steps = max(int(warmup_steps), 0)
  if schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(decay_steps, warmup_steps + 1),
        end_value=learning_rate * end_ratio)
  if schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
         optax.constant_schedule(learning_rate)], [warmup_steps])

  def rsqrt(step):
    step = jnp.asarray(step, jnp.float32) + 1.0
    warm = jnp.maximum(float(warmup_steps), 1.0)
    return learning_rate * jnp.minimum(step / warm, jnp.sqrt(warm / step))

  return rsqrt


def _decay_mask(params):
  """Weight decay on matrices only (kernels), not on biases, norms or position tables."""
  def is_kernel(path, _):
    return any(getattr(k, 'key', None) == 'kernel' for k in path)
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(*, learning_rate: float, schedule: str = 'cosine', warmup_steps: int = 0,
                   decay_steps: int = 1, end_ratio: float = 0.0, b1: float = 0.9,
                   b2: float = 0.98, eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
  """(optimizer, schedule): global-norm clipping then AdamW (Adam moments, decoupled weight
  decay, the scheduled learning rate: optax.adamw's order), the peak rate held in the state."""
  if learning_rate <= 0:
    raise ConfigError(f'optim.learning_rate={learning_rate}: must be positive')
  unit = make_schedule(learning_rate=1.0, schedule=schedule, warmup_steps=warmup_steps,
                       decay_steps=decay_steps, end_ratio=end_ratio)
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.add_decayed_weights(weight_decay, mask=_decay_mask),
            scale_by_peak_schedule(unit, learning_rate)]
  return optax.chain(*parts), PeakSchedule(unit, learning_rate)


def from_config(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) of `config.optim`, decaying over `config.train.num_steps`."""
  o = config.optim
  return make_optimizer(
      learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
      decay_steps=config.train.num_steps, end_ratio=o.end_ratio, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm)
