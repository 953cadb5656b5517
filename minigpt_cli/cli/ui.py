"""Rich consoles and small renderers shared by the commands. Only the CLI layer uses this."""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from minigpt_cli.cli.options import SETTING_FLAGS
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate.text import STREAM_INTERVAL


def _go_quiet(console: Console) -> None:
    """Write nothing more to ``console``, whose reader is gone: later writes and the
    interpreter's last flush go to /dev/null."""
    console.quiet = True
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, console.file.fileno())
        os.close(devnull)


class _Stdout(Console):
    """Rich's console, but when the reader of its output is gone (``generate | head``) it
    goes quiet and raises ``BrokenPipeError``, on which ``guarded`` ends the command with
    exit code 0 as for ``typer.echo``'s output; Rich's own exits with 1."""

    def on_broken_pipe(self) -> None:
        _go_quiet(self)
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


console = _Stdout(highlight=False)
err_console = Console(stderr=True, highlight=False)
for _c in (console, err_console):  # piped output: long lines stay whole, never wrapped at 80
    _c.soft_wrap = not _c.is_terminal

F = TypeVar("F", bound=Callable)


def error_line(message: str, hint: str | None = None) -> None:
    """One line on stderr: what went wrong and what to do about it."""
    text = f"[bold red]Error:[/] {escape(message)}"
    if hint:
        text += f" [dim]— {escape(hint)}[/]"
    err_console.print(text, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)


def guarded(fn: F) -> F:
    """Turn user-facing failures into a one-line error and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MiniGPTError as e:  # a setting is named by the flag that sets it
            error_line(e.renamed(SETTING_FLAGS), e.hint)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # e.g. `minigpt generate | head`
            sys.stderr.close()
            raise typer.Exit(0) from None
        except OSError as e:  # the system refused a path: too long, no space, read-only, ...
            if e.errno is None:
                raise
            where = f" {e.filename}" if e.filename else ""
            error_line(f"cannot use{where}: {e.strerror or e}",
                       "check the path, its permissions and the free space")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def quiet_after_broken_pipe(console: Console) -> Iterator[None]:
    """While the block runs, ``console`` goes quiet when the reader of its output is gone
    (``minigpt train | tee log``, and a Ctrl-C that ended tee too) instead of ending the
    command: a long job goes on, and saves and says (on stderr) what it was asked to."""
    console.on_broken_pipe = lambda: _go_quiet(console)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del console.on_broken_pipe


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def human_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# C0 controls but tab and newline, DEL, and C1 controls: shown as symbols on a terminal so
# that model output can never drive it (escape sequences, clearing the screen, ...).
_CONTROLS = {c: 0x2400 + c for c in range(0x20) if c not in (9, 10)} | {0x7F: 0x2421} \
    | {c: 0xFFFD for c in range(0x80, 0xA0)}


def terminal_safe(text: str) -> str:
    """Model text made harmless for a terminal: control characters become visible symbols."""
    return text.translate(_CONTROLS)


class StreamWriter:
    """Streamed model text for a console, written at most every ``interval`` seconds.

    Text that comes sooner than that after the last write waits for the next piece or for
    ``flush``, which the caller runs before writing anything else and at the end. A fast
    model samples a token every millisecond or two: a write per token, each one drawn by
    the terminal, cost ``generate`` about 13% of its speed on a 2-core machine. A slow
    model's tokens, further apart than the interval, are written as they come.
    """

    def __init__(self, console: Console, safe: Callable[[str], str] = lambda s: s,
                 interval: float = STREAM_INTERVAL):
        self.console, self.safe, self.interval = console, safe, interval
        self.parts: list[str] = []
        self.last = -math.inf

    def write(self, text: str) -> None:
        if not text:
            return
        self.parts.append(text)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self.parts:
            self.console.out(self.safe("".join(self.parts)), end="")
            self.parts.clear()
            self.last = time.monotonic() if now is None else now
