"""Matplotlib figures for TensorBoard and reports (headless backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def confusion_heatmap(
    confusion: Tensor, class_names: Sequence[str] | None = None, title: str = "robust confusion matrix", ax: Any = None
) -> tuple[Any, Any]:
    """Heatmap of a confusion matrix (rows = predicted, columns = true class)."""
    plt = _pyplot()
    c = confusion.detach().cpu().double().numpy()
    k = c.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if ax is None:
        size = min(2.0 + 0.45 * k, 14.0)
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
    else:
        fig = ax.figure
    image = ax.imshow(c, cmap="magma_r")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if k <= 30:
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        if k <= 15:
            for i in range(k):
                for j in range(k):
                    if c[i, j]:
                        value = f"{c[i, j]:.0f}" if float(c[i, j]).is_integer() else f"{c[i, j]:.2f}"
                        ax.text(j, i, value, ha="center", va="center", fontsize=7, color="tab:blue")
    ax.set_xlabel("true class")
    ax.set_ylabel("predicted class")
    ax.set_title(title)
    fig.tight_layout()
    return fig, ax


def classwise_bars(
    series: Mapping[str, Tensor | Sequence[float]],
    class_names: Sequence[str] | None = None,
    title: str = "per-class accuracy",
) -> tuple[Any, Any]:
    """Grouped bar chart of per-class values, one group per class and one bar per series."""
    plt = _pyplot()
    values = {
        name: np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=float) for name, v in series.items()
    }
    k = len(next(iter(values.values())))
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    width = 0.8 / max(len(values), 1)
    fig, ax = plt.subplots(figsize=(min(3.0 + 0.5 * k, 16.0), 3.5))
    for index, (label, v) in enumerate(values.items()):
        ax.bar(np.arange(k) + (index - (len(values) - 1) / 2) * width, 100 * v, width=width, label=label)
    ax.set_xticks(range(k), names, rotation=90 if k > 10 else 0)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    return fig, ax
