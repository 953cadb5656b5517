"""User-facing failures.

Anything a user can cause (a bad flag, a missing file, a wrong config value) raises a
``MiniGPTError``. The command boundary catches it once and prints a single line with its
hint; internal invariants use ``assert`` instead.
"""

from __future__ import annotations


class MiniGPTError(Exception):
    """A failure the user can fix; ``hint`` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(MiniGPTError):
    """A preset, config file or override is invalid."""


class DataError(MiniGPTError):
    """A dataset cannot be found, read or used."""


class TokenizerError(MiniGPTError):
    """A tokenizer spec is unknown or its files are unusable."""


class CheckpointError(MiniGPTError):
    """A run directory or checkpoint is missing, incomplete or corrupt."""


class DeviceError(MiniGPTError):
    """The requested device is not available."""
