"""Preemption: a SIGTERM (what a TPU VM maintenance event sends) makes every process of a job
save at one agreed step boundary and exit."""

from __future__ import annotations

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  """Notes SIGTERM (what a TPU VM maintenance event sends) so the loop can save at a step
  boundary and exit.

  One process: a Python handler (restored on exit) notes the signal, and `reached(step)` is true
  from the next step boundary on. Several processes: the signal may reach only some of them, and
  all must save the same step, so JAX's preemption service (started by
  `jax.distributed.initialize`, which catches SIGTERM itself) agrees on a step that every
  process reaches; `reached` must then be called at every step by every process.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM: saving at the end of this step, then exiting')
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop."""
    if not self.requested and jax.process_count() > 1:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
      if self.requested:
        logging.warning('preemption notice: every process saves step %d, then exits', step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
