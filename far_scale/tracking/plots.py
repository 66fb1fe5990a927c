"""The one way far-scale opens, finishes and writes a matplotlib figure: labelled axes, legend, PNG with its labels
(the benchmarks' plots too)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PNG_DPI = 110


def new_axes(columns: int = 1, figsize: tuple[float, float] = (7, 4.2)):
    """A figure and ``columns`` axes side by side (one Axes, or an array of them) with the non-interactive
    backend (headless machines, worker processes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=figsize)


def save_figure(fig, path: Path, metadata: Optional[dict] = None) -> Path:
    """Lay out, write ``path`` (PNG, with ``metadata`` in its text chunks) and close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PNG_DPI, metadata=metadata)
    plt.close(fig)
    return path


def save_axes(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, log_x: bool = False) -> Path:
    """Label, add legend and grid, write ``path`` (PNG) and close the figure.

    The title and axis labels also go into the PNG's text chunks, so tools (and tests) can read what a plot
    shows without looking at it.
    """
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, {"Title": title, "Description": f"x: {xlabel}; y: {ylabel}"})
