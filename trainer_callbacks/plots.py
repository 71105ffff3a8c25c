"""Routing figures: layers x experts heatmap, Auto Top-K histogram, tasks x experts specialisation.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas directly, never through pyplot:
pyplot keeps global state and may pick an interactive backend, which a training job (headless, maybe threaded) must
not touch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig: Any) -> np.ndarray:
    """RGB pixels (H, W, 3) of a figure, for TensorBoard's ``add_image(..., dataformats="HWC")``."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _short(name: str) -> str:
    for old, new in (("model.layers.", "L"), ("encoder.layer.", "L"), ("self_attn.", ""), ("attention.", "")):
        name = name.replace(old, new)
    return name.replace("mlp.", "")


def routing_heatmap(layer_usage: Mapping[str, Sequence[float]], title: str = "") -> Optional[Any]:
    """Wrapped layers (rows) x experts (columns): share of the tokens' selections that went to each expert."""
    if not layer_usage:
        return None
    names = list(layer_usage)
    usage = np.asarray([layer_usage[n] for n in names], dtype=float)
    fig = _figure(6.5, 1.5 + min(max(1.5, 0.22 * len(names)), 10.0))  # rows get thinner past ~45 layers
    ax = fig.add_subplot()
    im = ax.imshow(usage, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
    step = max(1, len(names) // 40)  # keep labels readable on deep models
    ax.set_yticks(range(0, len(names), step))
    ax.set_yticklabels([_short(names[i]) for i in range(0, len(names), step)], fontsize=6)
    ax.set_xticks(range(usage.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title(title or "LiME routing: share of selections per expert", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def active_experts_histogram(histogram: Sequence[float], title: str = "") -> Optional[Any]:
    """Fraction of (layer, token) pairs by number of experts Auto Top-K selected (1..E)."""
    counts = np.asarray(histogram, dtype=float)
    if counts.size < 2 or counts.sum() <= 0:
        return None
    share = counts / counts.sum()
    ks = np.arange(counts.size)
    mean = float((share * ks).sum())
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    ax.bar(ks[1:], share[1:], color="tab:blue")
    ax.set_xticks(ks[1:])
    ax.set_xlabel("active experts per token")
    ax.set_ylabel("share of tokens (all layers)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title or f"LiME Auto Top-K: experts per token (mean {mean:.2f})", fontsize=9)
    fig.tight_layout()
    return fig


def task_expert_figure(
    task_usage: Mapping[Any, Sequence[float]], mutual_information: float, title: str = ""
) -> Optional[Any]:
    """Tasks (rows) x experts (columns): mean routing probability, titled with I(task; expert) in nats."""
    if not task_usage:
        return None
    names = [str(t) for t in task_usage]
    usage = np.asarray(list(task_usage.values()), dtype=float)
    fig = _figure(6.5, 0.35 * len(names) + 1.8)
    ax = fig.add_subplot()
    im = ax.imshow(usage, aspect="auto", cmap="magma", interpolation="nearest", vmin=0.0)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xticks(range(usage.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title(title or f"LiME expert usage per task (I(task; expert) = {mutual_information:.4f} nats)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=dpi, format="png")
    return path
