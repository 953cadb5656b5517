"""PNG figures with matplotlib, an optional extra (``pip install 'minigpt[plot]'``).

matplotlib is imported only here, only when a figure is asked for, and draws with the Agg
backend onto its own ``Figure`` (pyplot's global state is never touched). Figures have a
fixed size in pixels: ``figsize * DPI``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minigpt_cli.errors import MiniGPTError

DPI = 100
RUN_FIGSIZE = (10.0, 8.0)  # inches: 1000 x 800 pixels
INSTALL_HINT = "pip install 'minigpt[plot]'"
TRAIN_COLOUR, VAL_COLOUR = "tab:blue", "tab:orange"


def attention_figsize(num_tokens: int) -> tuple[float, float]:
    """Inches for an attention map of ``num_tokens``: square cells, room for labels."""
    side = min(16.0, max(5.0, 2.0 + 0.16 * num_tokens))
    return side + 1.5, side  # the colour bar takes the extra width


def _new_figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MiniGPTError("--png needs matplotlib, which is not installed",
                           INSTALL_HINT) from e
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MiniGPTError(f"--png {path} does not end in .png", "name the file like plot.png")
    try:
        with warnings.catch_warnings():  # a glyph missing from the font is not worth a warning
            warnings.simplefilter("ignore", UserWarning)
            fig.savefig(path, dpi=DPI, format="png")
    except OSError as e:
        raise MiniGPTError(f"cannot write {path}: {e.strerror or e}",
                           "choose a writable path for --png") from e
    return path


def _escape(label: str) -> str:
    """Plain text for matplotlib: a pair of ``$`` would start math mode."""
    return label.replace("$", r"\$")


def training_figure(history: dict[str, Any], path: Path, title: str) -> Path:
    """Loss (training and validation), learning rate and tokens/s over steps, as a PNG.

    ``history`` is :meth:`minigpt_cli.run.history.History.to_dict`'s ``train`` and ``val``.
    """
    fig = _new_figure(RUN_FIGSIZE)
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 2))
    loss_ax = fig.add_subplot(grid[0, :])
    lr_ax = fig.add_subplot(grid[1, 0])
    speed_ax = fig.add_subplot(grid[1, 1])
    train, val = history["train"], history["val"]
    # a single logged step is a line of no length: draw it as a point
    point = {"marker": "o", "markersize": 4} if len(train["step"]) == 1 else {}

    if train["step"]:
        loss_ax.plot(train["step"], train["loss"], color=TRAIN_COLOUR, linewidth=1.2,
                     label="training loss", **point)
    if val["step"]:
        loss_ax.plot(val["step"], val["val_loss"], color=VAL_COLOUR, linewidth=1.8,
                     marker="o", markersize=4, label="validation loss")
    loss_ax.set_title("Loss")
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.legend(loc="upper right")

    lr_ax.plot(train["step"], train["lr"], color="tab:green", linewidth=1.4, **point)
    lr_ax.set_title("Learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    speed_ax.plot(train["step"], train["tokens_per_sec"], color="tab:purple", linewidth=1.2,
                  **point)
    speed_ax.set_title("Throughput")
    speed_ax.set_ylabel("tokens / s")
    speed_ax.set_ylim(bottom=0)

    for ax in (loss_ax, lr_ax, speed_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(_escape(title))
    return _save(fig, path)


def attention_figure(weights: Sequence[Sequence[float]], labels: Sequence[str], path: Path,
                     title: str, vmax: float = 1.0) -> Path:
    """A heat map of attention ``weights`` (queries by keys) with token labels, as a PNG.

    Colours run from 0 to ``vmax``; the masked upper triangle (future tokens) is blank.
    """
    n = len(labels)
    fig = _new_figure(attention_figsize(n))  # first: it explains a missing matplotlib
    import numpy as np
    from matplotlib import colormaps

    ax = fig.add_subplot()
    future = np.triu(np.ones((n, n), dtype=bool), k=1)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_array(weights, mask=future), cmap=cmap, vmin=0.0,
                      vmax=vmax, interpolation="nearest")
    every = max(1, -(-n // 64))  # at most 64 labels per axis
    ticks = list(range(0, n, every))
    font = 10 if n <= 32 else 8 if n <= 64 else 6
    names = [_escape(labels[i]) for i in ticks]
    ax.set_xticks(ticks, names, rotation=90, fontsize=font, fontfamily="monospace")
    ax.set_yticks(ticks, names, fontsize=font, fontfamily="monospace")
    ax.set_xlabel("key: the token attended to")
    ax.set_ylabel("query: the token attending")
    ax.set_title(_escape(title))
    fig.colorbar(image, ax=ax, label="attention weight", shrink=0.8,
                 extend="max" if vmax < 1.0 else "neither")
    return _save(fig, path)
