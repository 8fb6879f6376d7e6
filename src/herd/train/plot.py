"""Loss-curve PNG (matplotlib, from the `report` extra; without it the curve is skipped with a warning)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

Points = Sequence[tuple[float, float]]


def plot_losses(path: str | Path, train: Points, valid: Points = (), title: str = "") -> Path | None:
    """Write the train/valid loss curves to `path` (atomically); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'herd[report]'): no loss-curve PNG", stacklevel=2)
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if train:
        ax.plot(*zip(*train), color="tab:blue", lw=1, label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", color="tab:red", ms=3, label="valid loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG via a temp file + rename, and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
