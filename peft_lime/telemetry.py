"""Routing statistics readable by callbacks and users, accumulated on device and read only when asked.

Each LiME layer owns one ``RoutingStats`` per adapter. Recording is a handful of in-place tensor ops per layer and
call, with no host-device synchronisation; ``get_routing_stats`` turns the sums into Python numbers (one sync) and
can reset them, which is what a logging callback does at each logging step.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .routing import normalized_entropy

# Capacity of the per-task usage table (task ids are small integers put in batches by the collator).
MAX_TASKS = 256


class RoutingStats:
    """Sums over all recorded tokens since the last reset (padding excluded)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._sums: Optional[dict[str, torch.Tensor]] = None
        self.last_aux: Optional[torch.Tensor] = None
        self.last_importance: Optional[torch.Tensor] = None
        self.last_kl: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self._sums = None

    def _buffers(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._sums is None:
            E = self.num_experts
            z = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
            self._sums = {
                "tokens": z(()),
                "calls": z(()),
                "entropy": z(()),
                "active": z(()),
                "probs": z(E),
                "load": z(E),
                "importance": z(()),
                "kl": z(()),
                "task_probs": z(MAX_TASKS, E),
                "task_tokens": z(MAX_TASKS),
            }
        return self._sums

    @torch.no_grad()
    def record(
        self,
        probs: torch.Tensor,
        selected: torch.Tensor,
        valid: Optional[torch.Tensor],
        importance: torch.Tensor,
        kl: torch.Tensor,
        token_tasks: Optional[torch.Tensor] = None,
    ) -> None:
        """probs / selected: (N, E); valid: (N,) bool or None; token_tasks: (N,) task id per token or None."""
        s = self._buffers(probs.device)
        probs = probs.detach().float()
        w = torch.ones(probs.shape[0], device=probs.device) if valid is None else valid.float()
        s["tokens"] += w.sum()
        s["calls"] += 1
        s["entropy"] += (normalized_entropy(probs) * w).sum()
        s["active"] += (selected.float().sum(-1) * w).sum()
        s["probs"] += (probs * w[:, None]).sum(0)
        s["load"] += (selected.float() * w[:, None]).sum(0)
        s["importance"] += importance.detach().float()
        s["kl"] += kl.detach().float()
        if token_tasks is not None:
            tasks = token_tasks.clamp(0, MAX_TASKS - 1)
            s["task_probs"].index_add_(0, tasks, probs * w[:, None])
            s["task_tokens"].index_add_(0, tasks, w)

    def summary(self) -> Optional[dict[str, Any]]:
        """Python numbers (one device sync); None when nothing was recorded."""
        if self._sums is None:
            return None
        s = {k: v.cpu() for k, v in self._sums.items()}
        tokens = max(float(s["tokens"]), 1.0)
        calls = max(float(s["calls"]), 1.0)
        load = s["load"] / tokens
        usage = load / load.sum().clamp_min(1e-12)
        seen = s["task_tokens"] > 0
        out = {
            "tokens": float(s["tokens"]),
            "routing_entropy": float(s["entropy"]) / tokens,
            "active_experts": float(s["active"]) / tokens,
            "mean_probs": (s["probs"] / tokens).tolist(),
            "load": usage.tolist(),
            "load_imbalance": float(usage.max() / usage.mean().clamp_min(1e-12)),
            "importance_loss": float(s["importance"]) / calls,
            "kl_loss": float(s["kl"]) / calls,
            "task_usage": {
                int(t): (s["task_probs"][t] / s["task_tokens"][t]).tolist() for t in torch.nonzero(seen).flatten()
            },
            "task_tokens": {int(t): float(s["task_tokens"][t]) for t in torch.nonzero(seen).flatten()},
        }
        return out


def _lime_layers(model: nn.Module):
    from .layer import LimeLayer

    for name, module in model.named_modules():
        if isinstance(module, LimeLayer):
            yield name.removeprefix("base_model.model."), module


def get_routing_stats(model: nn.Module, adapter_name: Optional[str] = None, reset: bool = False) -> dict[str, Any]:
    """Routing statistics since the last reset: ``{"layers": {name: {...}}, "aggregate": {...}}``.

    Per layer: routing_entropy (normalised by log E), active_experts, mean_probs, load (usage share per expert),
    load_imbalance (max / mean usage), importance_loss, kl_loss, task_usage. The aggregate averages the layers
    and adds aux_loss = importance_loss_coef * importance + kl_loss_coef * kl as configured.
    """
    layers: dict[str, Any] = {}
    coefs = None
    for name, layer in _lime_layers(model):
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
    keys = ("routing_entropy", "active_experts", "load_imbalance", "importance_loss", "kl_loss")
    out: dict[str, Any] = {k: sum(v[k] for v in values) / len(values) for k in keys}
    imp_coef, kl_coef = coefs or (0.0, 0.0)
    out["aux_loss"] = imp_coef * out["importance_loss"] + kl_coef * out["kl_loss"]
    tasks: dict[int, list[float]] = {}
    for v in values:
        for t, usage in v["task_usage"].items():
            acc = tasks.setdefault(t, [0.0] * len(usage))
            tasks[t] = [a + u / len(values) for a, u in zip(acc, usage)]
    out["task_usage"] = tasks
    out["task_expert_mutual_information"] = task_expert_mutual_information(values)
    return out


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


def reset_routing_stats(model: nn.Module) -> None:
    """Forget all accumulated routing statistics."""
    for _, layer in _lime_layers(model):
        for stats in layer.lime_stats.values():
            stats.reset()


def get_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The load-balancing aux loss of the last training forward (detached), summed over layers; None if none."""
    total = None
    for _, layer in _lime_layers(model):
        for adapter in layer.active_adapters:
            stats = layer.lime_stats.get(adapter)
            if stats is not None and stats.last_aux is not None:
                total = stats.last_aux if total is None else total + stats.last_aux
    return total


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale of the injected aux-loss gradient; set it to 1 / gradient_accumulation_steps (the callbacks do)."""
    from .model import find_lime_model

    find_lime_model(model).routing_context.aux_loss_scale = float(scale)
