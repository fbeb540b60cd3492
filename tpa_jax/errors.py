"""Errors a user can fix: programs in `launch/` print their message and exit with status 1
instead of a traceback (which stays for bugs)."""

from __future__ import annotations


class UserError(Exception):
  """A mistake in what the user gave (a config, a path, a file); the message says what to do."""


class ConfigError(UserError, ValueError):
  """A config field with a value that is not accepted, or a field a config lacks."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint or base that cannot be written, found or read."""


class SpecMismatchError(CheckpointError, ValueError):
  """Adapters (an export or a run checkpoint) that do not fit this config or base. Never
  corruption: nothing is moved or deleted because of it."""
