"""Routing telemetry of a model: read, reset, pause and sum over ranks the statistics of every LiME layer.

Each LiME layer owns one ``RoutingStats`` per adapter (stats.py). ``get_routing_stats`` turns their sums into Python
numbers (one sync) and can reset them, which is what a logging callback does at each logging step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from .layer import LimeLayer
from .model import find_lime_model
from .stats import RoutingStats  # noqa: F401  (its home before 0.2; kept importable from here)

# The per-layer scalar statistics that the aggregate averages over layers (and callbacks log).
SCALAR_KEYS = ("routing_entropy", "active_experts", "load_imbalance", "importance_loss", "kl_loss")


def lime_layers(model: nn.Module) -> Iterator[tuple[str, LimeLayer]]:
    """(name, layer) of every LiME layer of ``model``; names without the PeftModel prefix."""
    for name, module in model.named_modules():
        if isinstance(module, LimeLayer):
            yield name.removeprefix("base_model.model."), module


def sync_routing_stats(model: nn.Module, group: Optional[Any] = None) -> bool:
    """Sum every LiME layer's routing statistics over the ranks of ``group`` (default: all ranks), in place.

    Under DDP / FSDP each rank only records the tokens of its own micro-batches; every statistic is kept as a sum
    (tokens, probabilities, loads, per-call balance terms, task tables), so summing the sums over ranks gives exactly
    the statistics of the global batch. One collective for the whole model; every rank of the group must call it at
    the same point (a logging callback does, since the Trainer logs on every rank). Returns False without
    communicating when torch.distributed is not initialised or the group has a single rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return False
    buffers: list[torch.Tensor] = []
    # named_modules order is the same on every rank (same model code), so the flattened layouts line up.
    for _, layer in lime_layers(model):
        for adapter in sorted(layer.lime_stats):
            # A rank that recorded nothing still takes part, with zeros on the device the experts live on.
            device = next(layer.lime_experts[adapter].parameters()).device
            buffers += list(layer.lime_stats[adapter].sums(device).values())
    if not buffers:
        return False
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
    return True


def get_routing_stats(model: nn.Module, adapter_name: Optional[str] = None, reset: bool = False) -> dict[str, Any]:
    """Routing statistics since the last reset: ``{"layers": {name: {...}}, "aggregate": {...}}``.

    Per layer: routing_entropy (normalised by log E), active_experts, mean_probs, load (usage share per expert),
    load_imbalance (max / mean usage), importance_loss, kl_loss, task_usage, task_tokens and active_histogram
    (valid tokens by number of selected experts, index 0..E). The aggregate averages the layers
    and adds aux_loss = importance_loss_coef * importance + kl_loss_coef * kl as configured, the task usage, the
    task-expert mutual information (nats) and the active-experts histogram summed over layers.
    """
    layers: dict[str, Any] = {}
    coefs = None
    for name, layer in lime_layers(model):
        names = [adapter_name] if adapter_name else list(layer.active_adapters)
        for adapter in names:
            stats = layer.lime_stats.get(adapter)
            if stats is None:
                continue
            summary = stats.summary()
            if reset:
                stats.reset()
            if summary is not None:
                layers[name if len(names) == 1 else f"{name}[{adapter}]"] = summary
                settings = layer.lime_routing[adapter]
                coefs = (settings.importance_loss_coef, settings.kl_loss_coef)
    return {"layers": layers, "aggregate": aggregate_layer_stats(layers, coefs)}


def aggregate_layer_stats(layers: dict[str, Any], coefs: Optional[tuple[float, float]]) -> dict[str, Any]:
    """Mean over layers of the scalar statistics, plus the configured aux loss and task usage."""
    if not layers:
        return {}
    values = list(layers.values())
    out: dict[str, Any] = {k: sum(v[k] for v in values) / len(values) for k in SCALAR_KEYS}
    imp_coef, kl_coef = coefs or (0.0, 0.0)
    out["aux_loss"] = imp_coef * out["importance_loss"] + kl_coef * out["kl_loss"]
    out["task_usage"] = mean_task_usage(values)
    # Summed over layers: counts (layer, token) pairs by number of selected experts.
    hist: list[float] = []
    for v in values:
        h = v.get("active_histogram", [])
        hist = [a + b for a, b in zip(hist + [0.0] * (len(h) - len(hist)), h + [0.0] * (len(hist) - len(h)))]
    out["active_histogram"] = hist
    out["task_expert_mutual_information"] = task_expert_mutual_information(values)
    return out


def mean_task_usage(layer_summaries: list[dict[str, Any]]) -> dict[int, list[float]]:
    """Per task, the mean over layers of the task's mean routing probabilities (layers that saw the task)."""
    tasks: dict[int, list[float]] = {}
    for v in layer_summaries:
        for t, usage in v["task_usage"].items():
            acc = tasks.setdefault(t, [0.0] * len(usage))
            tasks[t] = [a + u / len(layer_summaries) for a, u in zip(acc, usage)]
    return dict(sorted(tasks.items()))


def task_expert_mutual_information(layer_summaries: list[dict[str, Any]]) -> float:
    """Mean over layers of I(task; expert) in nats, from token-weighted routing probabilities per task."""
    mis = []
    for v in layer_summaries:
        usage, weights = v["task_usage"], v["task_tokens"]
        if len(usage) < 2:
            continue
        total = sum(weights.values())
        joint = {t: [weights[t] / total * p for p in usage[t]] for t in usage}
        p_expert = [sum(joint[t][i] for t in joint) for i in range(len(next(iter(usage.values()))))]
        mi = 0.0
        for t, row in joint.items():
            p_task = weights[t] / total
            for i, pj in enumerate(row):
                if pj > 0 and p_expert[i] > 0:
                    mi += pj * math.log(pj / (p_task * p_expert[i]))
        mis.append(mi)
    return sum(mis) / len(mis) if mis else 0.0


STATS_MODES = ("training", "always", "off")


def set_routing_stats_mode(model: nn.Module, mode: str) -> None:
    """When the LiME layers of ``model`` record routing statistics.

    ``"training"`` (default): in training-mode forwards only, so evaluation, inference and ``generate`` pay nothing;
    ``"always"``: also in eval mode (to read the routing of an evaluation set or of generated text);
    ``"off"``: never. ``set_routing_stats_enabled`` pauses / resumes recording on top of the mode.
    """
    if mode not in STATS_MODES:
        raise ValueError(f"mode: must be one of {STATS_MODES}, got {mode!r}")
    find_lime_model(model).routing_context.stats_mode = mode


@contextlib.contextmanager
def recording_routing_stats(model: nn.Module, mode: str = "always") -> Iterator[None]:
    """Context manager: record routing statistics with ``mode`` (default "always") inside, restore the mode after.

    Example: ``with peft_lime.recording_routing_stats(model): evaluate(model)`` then ``get_routing_stats(model)``.
    """
    context = find_lime_model(model).routing_context
    previous = context.stats_mode
    set_routing_stats_mode(model, mode)
    try:
        yield
    finally:
        context.stats_mode = previous


def set_routing_stats_enabled(model: nn.Module, enabled: bool) -> None:
    """Pause (False) or resume (True) the recording of routing statistics in every LiME layer of ``model``."""
    for _, layer in lime_layers(model):
        for stats in layer.lime_stats.values():
            stats.enabled = bool(enabled)


def reset_routing_stats(model: nn.Module) -> None:
    """Forget all accumulated routing statistics."""
    for _, layer in lime_layers(model):
        for stats in layer.lime_stats.values():
            stats.reset()
