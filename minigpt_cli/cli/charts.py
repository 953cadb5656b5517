"""Charts drawn in the terminal with Rich: braille line charts, bars and heat maps.

Each chart is a Rich renderable that sizes itself to the width it is given, and falls back
to shapes (no colours) where the console has none. Only the CLI layer uses this.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.color import Color
from rich.console import Console, ConsoleOptions, RenderResult
from rich.style import Style
from rich.text import Text

BRAILLE = 0x2800
# the dot bit for (x % 2, y % 4) inside one braille cell, y counted from the top
DOT_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
EIGHTHS = " ▏▎▍▌▋▊▉█"
SHADES = " ░▒▓█"
# viridis, sampled: dark purple (low) to yellow (high); readable on dark and light themes
GRADIENT = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def visible(piece: str) -> str:
    """A token's text with whitespace made visible, for labels."""
    return (piece.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
            .replace("\r", "␍"))


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of ``fraction`` (0-1) of ``width`` cells, in eighths of a cell."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (EIGHTHS[part] if part else "")).ljust(width)


def gradient(t: float) -> Color:
    """The colour for ``t`` in [0, 1] on :data:`GRADIENT`."""
    t = max(0.0, min(1.0, t)) * (len(GRADIENT) - 1)
    i = min(int(t), len(GRADIENT) - 2)
    f = t - i
    a, b = GRADIENT[i], GRADIENT[i + 1]
    return Color.from_rgb(*(round(x + (y - x) * f) for x, y in zip(a, b, strict=True)))


def compact(x: float) -> str:
    """A short label for an axis value: about 3 significant digits."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if abs(x) >= 100_000:
        return f"{x / 1000:,.0f}k"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.3g}"


# ---- line charts -------------------------------------------------------------------------------

@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    style: str = "cyan"
    marker: str | None = None  # drawn at each point, when there are few enough to tell apart


class LineChart:
    """Series over a shared x axis as braille lines, with labelled axes and a legend.

    When a series has more points than the chart has dot columns, each column shows the
    mean of its points, which also smooths a noisy training loss.
    """

    def __init__(self, title: str, series: list[Series], height: int = 8,
                 x_label: str = "step", fmt: Callable[[float], str] = compact,  # y ticks
                 max_width: int = 100):
        self.title = title
        self.series = [s for s in series if len(s.xs)]
        self.height = max(2, height)
        self.x_label = x_label
        self.fmt = fmt
        self.max_width = max_width

    def _ranges(self) -> tuple[float, float, float, float]:
        xs = [x for s in self.series for x in s.xs]
        ys = [y for s in self.series for y in s.ys]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        if y1 - y0 < 1e-12 * max(1.0, abs(y1)):  # a flat line: centre it
            pad = abs(y0) * 0.1 or 1.0
            y0, y1 = y0 - pad, y1 + pad
        return x0, max(x1, x0 + 1e-12), y0, y1

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        legend = Text().append(self.title, style="bold")
        for s in self.series if len(self.series) > 1 else []:
            legend.append(f"   {s.marker or '━'} ", style=s.style).append(s.label)
        yield legend
        if not self.series:
            yield Text("  (no data)", style="dim")
            return
        x0, x1, y0, y1 = self._ranges()
        ticks = [self.fmt(y1), self.fmt((y0 + y1) / 2), self.fmt(y0)]
        label_w = max(map(len, ticks))
        width = max(10, min(options.max_width, self.max_width) - label_w - 2)
        cols, rows = 2 * width, 4 * self.height
        bits = [[0] * width for _ in range(self.height)]
        styles: list[list[str | None]] = [[None] * width for _ in range(self.height)]

        marks: dict[tuple[int, int], tuple[str, str]] = {}  # (row, column): (marker, style)

        def plot(cx: int, cy: int, style: str) -> None:
            r, c = cy // 4, cx // 2
            bits[r][c] |= DOT_BITS[cx % 2][cy % 4]
            styles[r][c] = style

        for s in self.series:
            points = _column_means(s.xs, s.ys, x0, x1, cols)
            dots = [(cx, round((y1 - y) / (y1 - y0) * (rows - 1))) for cx, y in points]
            for (ax, ay), (bx, by) in zip(dots, dots[1:], strict=False):
                for cx, cy in _segment(ax, ay, bx, by):
                    plot(cx, cy, s.style)
            if len(dots) == 1:
                plot(*dots[0], s.style)
            if s.marker and len(dots) <= width // 3:
                marks.update({(cy // 4, cx // 2): (s.marker, s.style) for cx, cy in dots})

        tick_rows = {0: ticks[0], (self.height - 1) // 2: ticks[1], self.height - 1: ticks[2]}
        for r in range(self.height):
            line = Text().append(f"{tick_rows.get(r, ''):>{label_w}} "
                                 + ("┤" if r in tick_rows else "│"), style="dim")
            for c in range(width):
                if (r, c) in marks:
                    line.append(*marks[r, c])
                else:
                    line.append(chr(BRAILLE + bits[r][c]) if bits[r][c] else " ",
                                style=styles[r][c])
            yield line
        yield Text(" " * label_w + " └" + "─" * width, style="dim")
        left, mid, right = compact(x0), compact((x0 + x1) / 2), compact(x1)
        axis = [" "] * width
        for pos, label in ((0, left), ((width - len(mid)) // 2, mid), (width - len(right), right)):
            axis[max(pos, 0):max(pos, 0) + len(label)] = label
        yield Text(" " * (label_w + 2) + "".join(axis)[:width], style="dim")
        yield Text(f"{self.x_label:^{label_w + 2 + width}}", style="dim")


def _column_means(xs: Sequence[float], ys: Sequence[float], x0: float, x1: float,
                  cols: int) -> list[tuple[int, float]]:
    """The mean y of the points in each dot column that has any, left to right."""
    sums: dict[int, list[float]] = {}
    for x, y in zip(xs, ys, strict=True):
        c = min(cols - 1, max(0, round((x - x0) / (x1 - x0) * (cols - 1))))
        acc = sums.setdefault(c, [0.0, 0])
        acc[0] += y
        acc[1] += 1
    return [(c, total / n) for c, (total, n) in sorted(sums.items())]


def _segment(ax: int, ay: int, bx: int, by: int) -> list[tuple[int, int]]:
    """The dots on the straight line from (ax, ay) to (bx, by) (Bresenham)."""
    dots = []
    dx, dy = abs(bx - ax), -abs(by - ay)
    sx, sy = (1 if bx > ax else -1), (1 if by > ay else -1)
    err = dx + dy
    while True:
        dots.append((ax, ay))
        if ax == bx and ay == by:
            return dots
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            ax += sx
        if e2 <= dx:
            err += dx
            ay += sy


# ---- heat maps ---------------------------------------------------------------------------------

class HeatMap:
    """A lower-triangular matrix of weights with token labels on both axes.

    Rows are queries, columns keys. Colours (or, without colours, the shades ░▒▓█) run
    from 0 to ``vmax``; larger weights get the top colour. Each cell is two characters
    wide, or one when that is the only way to fit; when even that does not fit, the last
    tokens are shown and a note says so.
    """

    def __init__(self, weights: Sequence[Sequence[float]], labels: Sequence[str],
                 vmax: float = 1.0, max_label_width: int = 10):
        assert len(weights) == len(labels), "one label per row"
        self.weights = weights
        self.labels = [visible(x) or "·" for x in labels]  # "": part of a character
        self.vmax = vmax if vmax > 0 else 1.0
        self.label_width = max(1, min(max_label_width, max(map(cell_len, self.labels),
                                                            default=1)))

    def layout(self, max_width: int) -> tuple[int, int]:
        """(first token shown, cell width) for a console ``max_width`` cells wide."""
        n = len(self.labels)
        room = max(1, max_width - self.label_width - len(str(n - 1)) - 2)
        cell = 2 if 2 * n <= room else 1
        return max(0, n - room // cell), cell

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        n = len(self.labels)
        start, cell = self.layout(options.max_width)
        colour = console.color_system is not None
        index_w = len(str(n - 1))
        header = Text(" " * (index_w + 1 + self.label_width + 1))
        for j in range(start, n):
            header.append(set_cell_size(self.labels[j], cell), style="bold")
        yield header
        for i in range(start, n):
            line = Text().append(f"{i:>{index_w}} ", style="dim")
            line.append(set_cell_size(self.labels[i], self.label_width) + " ")
            for j in range(start, i + 1):
                t = float(self.weights[i][j]) / self.vmax
                if colour:
                    line.append(" " * cell, style=Style(bgcolor=gradient(t)))
                else:
                    level = math.ceil(min(1.0, max(0.0, t)) * (len(SHADES) - 1))
                    line.append(SHADES[level] * cell)
            yield line
        if start:
            yield Text(f"showing the last {n - start} of {n} tokens", style="dim")
        yield self._legend(colour)

    def _legend(self, colour: bool) -> Text:
        top = f"{self.vmax:.2g}" + (" and above" if self.vmax < 1 else "")
        legend = Text().append("weight 0 ", style="dim")
        if colour:
            for k in range(20):
                legend.append(" ", style=Style(bgcolor=gradient(k / 19)))
        else:
            legend.append(" ".join(SHADES[1:]))
        return legend.append(f" {top}", style="dim")
