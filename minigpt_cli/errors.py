"""User-facing failures.

Anything a user can cause (a bad flag, a missing file, a wrong config value) raises a
``MiniGPTError``. The command boundary catches it once and prints a single line with its
hint; internal invariants use ``assert`` instead.
"""

from __future__ import annotations


class MiniGPTError(Exception):
    """A failure the user can fix; ``hint`` says how.

    ``setting`` names the setting whose value is at fault (``temperature``, ``layer``,
    ``device``), and the message then starts with that name. Core code knows settings, not
    how they are set: the layer in front (a CLI flag, an HTTP field, a ``/set`` key) may
    put its own name for it in place.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, *, setting: str | None = None):
        super().__init__(message)
        assert setting is None or message.startswith(setting), (setting, message)
        self.message = message
        self.hint = hint
        self.setting = setting

    def renamed(self, names: dict[str, str]) -> str:
        """The message with the setting called by its name in ``names``, when it has one."""
        if self.setting is None or self.setting not in names:
            return self.message
        return names[self.setting] + self.message[len(self.setting):]

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(MiniGPTError):
    """A preset, config file or override is invalid."""


class DataError(MiniGPTError):
    """A dataset cannot be found, read or used."""


class TokenizerError(MiniGPTError):
    """A tokenizer spec is unknown or its files are unusable (raised by tokenizer plugins
    too: ``minigpt_tokenizers.TokenizerError`` is this class)."""


class CheckpointError(MiniGPTError):
    """A run directory or checkpoint is missing, incomplete or corrupt."""


class DeviceError(MiniGPTError):
    """The requested device is not available."""


class ConvertError(MiniGPTError):
    """A model or tokenizer cannot be exported to, or imported from, another format."""
