"""Where minigpt keeps things on this machine when nobody says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

RUNS_DIR = Path("runs")  # new runs go here, and commands look here for the latest one


def cache_dir() -> Path:
    """Token caches, downloads and the built-in corpus: ``$MINIGPT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/minigpt``, else ``~/.cache/minigpt``."""
    if os.environ.get("MINIGPT_CACHE_DIR"):
        return Path(os.environ["MINIGPT_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "minigpt"
    return Path.home() / ".cache" / "minigpt"


def data_dir() -> Path:
    """Chat history and other user data: ``$MINIGPT_DATA_DIR``, else
    ``$XDG_DATA_HOME/minigpt``, else ``~/.local/share/minigpt``."""
    if os.environ.get("MINIGPT_DATA_DIR"):
        return Path(os.environ["MINIGPT_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "minigpt"
