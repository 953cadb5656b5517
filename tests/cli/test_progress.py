"""The data progress bars: a stage of unknown size leaves no bar behind once it is done."""

from __future__ import annotations

import io

from rich.console import Console

from minigpt_cli.cli.progress import DataProgress


def test_a_stage_of_unknown_size_is_removed_when_the_next_one_starts():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with DataProgress(console) as view:
        view("preparing tokenizer char", 0, 0)  # how long it takes is unknown
        view("tokenizing train", 0, 100)
        view("tokenizing train", 100, 100)
        view("tokenizing val", 5, 10)
        stages = [t.description for t in view._progress.tasks]
    assert stages == ["tokenizing train", "tokenizing val"]
