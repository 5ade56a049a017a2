"""Errors that reach the user.

Every error a user can cause (a bad file, a bad option, a full cache) is a :class:`HamError`. The CLI prints
its message without a traceback and exits with its ``exit_code``: 2 for bad usage or input, 1 for a check or a
budget that failed. Anything else that escapes is a bug in ham-export.
"""

from __future__ import annotations


class HamError(Exception):
    """An error with a message meant for the user."""

    exit_code = 2


class ConfigError(HamError, ValueError):
    """A model configuration that cannot describe a HAM model."""


class CheckpointError(HamError):
    """A checkpoint that cannot be loaded safely: unreadable, truncated, foreign or inconsistent."""


class InputError(HamError, ValueError):
    """A call with arguments of the wrong shape, dtype or value (a NaN threshold, an empty prompt, ...)."""


class CacheFullError(HamError):
    """A routed token found the KV cache at capacity and the policy is to refuse."""


class MissingDependencyError(HamError):
    """Something the command needs is not installed here (TensorRT, a GPU); the message says what to install."""
