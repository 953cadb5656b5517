"""The terminal charts: line charts and heat maps drawn with rich."""

from __future__ import annotations

import io
import math

import numpy as np
from rich.console import Console

from minigpt_cli.cli import charts


def render(renderable, width: int) -> list[str]:
    console = Console(width=width, color_system=None, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text().splitlines()


def test_line_chart_fits_its_width_and_labels_its_axes():
    xs = list(range(0, 1000, 7))
    chart = charts.LineChart("loss", [charts.Series("train", xs, [math.exp(-x / 300) for x in xs]),
                                      charts.Series("val", [0, 500, 994], [1.0, 0.3, 0.05])],
                             height=6)
    lines = render(chart, 60)
    assert all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("loss") and "train" in lines[0] and "val" in lines[0]
    assert lines[1].split()[0] == "1" and "994" in lines[-2] and lines[-1].strip() == "step"
    assert sum(any("⠁" <= c <= "⣿" for c in line) for line in lines) == 6


def test_heat_map_shows_the_last_tokens_that_fit():
    n = 70
    w = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    heat_map = charts.HeatMap(w.tolist(), ["x"] * n)
    assert charts.HeatMap(w[:20, :20].tolist(), ["x"] * 20).layout(60) == (0, 2)
    start, cell = heat_map.layout(60)  # 1 cell per token when 2 do not fit, then the last ones
    assert 0 < start < n and cell == 1
    lines = render(heat_map, 60)
    assert all(len(line) <= 60 for line in lines)
    assert f"showing the last {n - start} of {n} tokens" in lines[-2]
    assert lines[1].split()[0] == str(start) and len(lines) == n - start + 3
    assert charts.bar(0.5, 4) == "██  " and charts.bar(1 / 32, 4) == "▏   "
