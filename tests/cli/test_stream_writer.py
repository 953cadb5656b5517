"""Streamed text reaches the terminal at most every STREAM_INTERVAL seconds, and whole."""

from __future__ import annotations

import io

from rich.console import Console

from minigpt_cli.cli import ui


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder(Console):
    """A console that keeps every write it is asked for, in order."""

    def __init__(self):
        super().__init__(file=io.StringIO(), color_system=None)
        self.writes: list[str] = []

    def out(self, *objects, **kwargs):
        self.writes.append("".join(map(str, objects)))
        super().out(*objects, **kwargs)


def test_fast_pieces_go_out_together_and_a_flush_shows_the_rest(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ui.time, "monotonic", clock)
    console = Recorder()
    out = ui.StreamWriter(console, interval=0.02)
    out.write("a")  # the first piece at once
    for piece in "bcd":
        clock.now += 0.005
        out.write(piece)
    assert console.writes == ["a"]
    clock.now += 0.006  # 21 ms after the last write: everything held goes out with it
    out.write("e")
    out.write("")
    clock.now += 0.001
    out.write("f")
    assert console.writes == ["a", "bcde"]
    out.flush()
    out.flush()  # nothing held: no empty write
    assert console.writes == ["a", "bcde", "f"]
    assert console.file.getvalue() == "abcdef"


def test_slow_pieces_are_written_as_they_come(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ui.time, "monotonic", clock)
    console = Recorder()
    out = ui.StreamWriter(console, safe=ui.terminal_safe, interval=0.02)
    for piece in ("one", " two", "\x1b[2J"):
        out.write(piece)
        clock.now += 0.05
    assert console.writes == ["one", " two", "␛[2J"]  # each made safe for the terminal
