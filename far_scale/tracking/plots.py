"""The one way far-scale finishes and writes a matplotlib figure: labelled axes, legend, PNG with its labels."""

from __future__ import annotations

from pathlib import Path


def new_axes():
    """A figure and axes with the non-interactive backend (headless machines, worker processes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2))


def save_axes(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, log_x: bool = False) -> Path:
    """Label, add legend and grid, write ``path`` (PNG) and close the figure.

    The title and axis labels also go into the PNG's text chunks, so tools (and tests) can read what a plot
    shows without looking at it.
    """
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Title": title, "Description": f"x: {xlabel}; y: {ylabel}"})
    plt.close(fig)
    return path
