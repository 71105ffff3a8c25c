"""Routing report and figures of the main job: telemetry grouped by task and modality, routing heatmap, task x expert
usage, and per-task accuracy before / after training."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from ..mini_mmt.data import MODALITIES, TaskInfo


def routing_summary(peft_model: torch.nn.Module, tasks: tuple[TaskInfo, ...]) -> dict[str, Any]:
    """``peft_lime.get_routing_stats``, with task ids turned into names and usage grouped by modality."""
    import peft_lime

    stats = peft_lime.get_routing_stats(peft_model)
    agg = dict(stats["aggregate"])
    names = {t.task_id: t.name for t in tasks}
    modality = {t.task_id: t.modality for t in tasks}
    task_usage = {int(k): v for k, v in agg.pop("task_usage", {}).items()}
    layers = stats["layers"]
    first = next(iter(layers.values()), {})
    tokens = {int(k): v for k, v in first.get("task_tokens", {}).items()}  # the same tokens reach every layer
    per_modality: dict[str, list[float]] = {}
    for mod in MODALITIES:
        ids = [t for t in task_usage if modality.get(t) == mod]
        weight = sum(tokens.get(t, 0.0) for t in ids)
        if ids and weight > 0:
            E = len(task_usage[ids[0]])
            per_modality[mod] = [sum(task_usage[t][i] * tokens.get(t, 0.0) for t in ids) / weight for i in range(E)]
    return {
        "aggregate": agg,
        "task_expert_mutual_information": agg.get("task_expert_mutual_information"),
        "per_task_usage": {names.get(t, str(t)): u for t, u in sorted(task_usage.items())},
        "per_task_tokens": {names.get(t, str(t)): n for t, n in sorted(tokens.items())},
        "per_modality_usage": per_modality,
        "layers": {
            name: {k: v[k] for k in ("load", "mean_probs", "routing_entropy", "active_experts", "load_imbalance")}
            for name, v in layers.items()
        },
    }


def accuracy_bars(
    before: Mapping[str, float], after: Mapping[str, Mapping[str, float]], chance: Mapping[str, float], title: str = ""
) -> Optional[Any]:
    """Grouped bars per task: accuracy before training, after training for each method, and chance as a tick."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(before)
    if not tasks:
        return None
    series = {"before": before, **{f"after ({m})": acc for m, acc in after.items()}}
    fig = Figure(figsize=(max(6.0, 1.1 * len(tasks) + 2), 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(tasks))
    width = 0.8 / len(series)
    for i, (name, acc) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [acc[t] for t in tasks], width, label=name)
    ax.scatter(x, [chance[t] for t in tasks], marker="_", s=400, color="black", label="chance", zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, ncol=len(series) + 1, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_figures(
    routing: Optional[Mapping[str, Any]],
    bars: tuple[Mapping[str, float], Mapping[str, Mapping[str, float]], Mapping[str, float], str],
    out_dir: Path,
) -> list[str]:
    """routing_heatmap.png (layers x experts), task_expert_usage.png (tasks and modalities x experts) and
    accuracy_before_after.png; returns the names written."""
    from trainer_callbacks import plots

    figures: dict[str, Any] = {"accuracy_before_after.png": accuracy_bars(*bars)}
    if routing is not None:
        rows = dict(routing["per_task_usage"])
        rows.update({f"[{m}]": u for m, u in routing["per_modality_usage"].items()})
        mi = routing.get("task_expert_mutual_information") or 0.0
        figures["routing_heatmap.png"] = plots.routing_heatmap(
            {name: layer["load"] for name, layer in routing["layers"].items()},
            title="LiME routing: share of selections per expert (evaluation set)",
        )
        figures["task_expert_usage.png"] = plots.task_expert_figure(
            rows, mi, title=f"mean routing probability per task / modality (I(task; expert) = {mi:.4f} nats)"
        )
    written = []
    for name, fig in figures.items():
        if fig is not None:
            plots.save_figure(fig, out_dir / name)
            written.append(name)
    return written
