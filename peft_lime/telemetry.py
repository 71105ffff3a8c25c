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
# Recording only keeps references to the call's (N, E) tensors and folds them into the sums in batches: about twenty
# small ops per fold instead of per layer call, which dominated cached decoding (one token per call). Bounds on what
# waits: tokens (memory: N x E floats each) and calls.
MAX_PENDING_TOKENS = 2048
MAX_PENDING_CALLS = 256


class RoutingStats:
    """Sums over all recorded tokens since the last reset (padding excluded)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._sums: Optional[dict[str, torch.Tensor]] = None
        # A training callback pauses recording between optimizer steps, so evaluation forwards made during training
        # do not mix into the training statistics (see ``set_routing_stats_enabled``).
        self.enabled = True
        self.last_aux: Optional[torch.Tensor] = None
        self.last_importance: Optional[torch.Tensor] = None
        self.last_kl: Optional[torch.Tensor] = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        self._pending_tokens = 0

    def reset(self) -> None:
        self._sums = None
        self._pending, self._pending_tokens = [], 0

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
                # Tokens by number of selected experts (0..E): the Auto Top-K histogram.
                "active_hist": z(E + 1),
            }
        return self._sums

    @torch.no_grad()
    def record(
        self,
        probs: torch.Tensor,
        selected: torch.Tensor,
        valid: Optional[torch.Tensor],
        importance: Optional[torch.Tensor] = None,
        kl: Optional[torch.Tensor] = None,
        token_tasks: Optional[torch.Tensor] = None,
    ) -> None:
        """probs / selected: (N, E); valid: (N,) bool or None; token_tasks: (N,) task id per token or None.

        importance / kl are accepted for compatibility and not used: the per-call balance terms are recomputed from
        probs and valid when folding (the definition of ``routing.balance_terms``), so callers need not compute them
        outside training.
        """
        if not self.enabled:
            return
        self._pending.append((probs.detach() if probs.requires_grad else probs, selected, valid, token_tasks))
        self._pending_tokens += probs.shape[0]
        if self._pending_tokens >= MAX_PENDING_TOKENS or len(self._pending) >= MAX_PENDING_CALLS:
            self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        """Add the pending calls to the sums: one batch of ops for all of them, no host-device sync."""
        entries, self._pending, self._pending_tokens = self._pending, [], 0
        if not entries:
            return
        E, K = self.num_experts, len(entries)
        probs = torch.cat([e[0].reshape(-1, E) for e in entries]).float()
        device, counts = probs.device, [e[0].numel() // E for e in entries]
        s = self._buffers(device)
        selected = torch.cat([e[1].reshape(-1, E) for e in entries])
        if all(e[2] is None for e in entries):
            w = torch.ones(probs.shape[0], device=device)
        else:
            w = torch.cat(
                [e[2].reshape(-1).float() if e[2] is not None else probs.new_ones(n) for e, n in zip(entries, counts)]
            )
        # Call index of every token, for the per-call balance terms.
        if len(set(counts)) == 1:
            call = torch.arange(K, device=device).repeat_interleave(counts[0])
        else:
            call = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
        pw = probs * w[:, None]
        per_call = torch.zeros(K, E + 1, device=device).index_add_(0, call, torch.cat([pw, w[:, None]], 1))
        pbar = per_call[:, :E] / per_call[:, E:].clamp_min(1.0)
        s["importance"] += (E * pbar.square().sum(-1) - 1.0).sum()
        s["kl"] += (pbar * torch.log(pbar.clamp_min(1e-12) * E)).sum()
        s["tokens"] += w.sum()
        s["calls"] += K
        s["entropy"] += normalized_entropy(probs) @ w
        n_active = selected.sum(-1)
        s["active"] += n_active.float() @ w
        s["active_hist"].index_add_(0, n_active.reshape(-1).long(), w)
        s["probs"] += pw.sum(0)
        s["load"] += w @ selected.float()
        if any(e[3] is not None for e in entries):
            tasks = torch.cat(
                [
                    e[3].reshape(-1) if e[3] is not None else torch.full((n,), -1, device=device)
                    for e, n in zip(entries, counts)
                ]
            ).to(device=device, dtype=torch.long)
            wt = w * (tasks >= 0)
            tasks = tasks.clamp(0, MAX_TASKS - 1)
            s["task_probs"].index_add_(0, tasks, probs * wt[:, None])
            s["task_tokens"].index_add_(0, tasks, wt)

    def summary(self) -> Optional[dict[str, Any]]:
        """Python numbers (one device sync); None when nothing was recorded."""
        self._fold()
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
            "active_histogram": s["active_hist"].tolist(),
        }
        return out


def _lime_layers(model: nn.Module):
    from .layer import LimeLayer

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
    for _, layer in _lime_layers(model):
        for adapter in sorted(layer.lime_stats):
            stats = layer.lime_stats[adapter]
            stats._fold()
            # A rank that recorded nothing still takes part, with zeros on the device the experts live on.
            device = next(layer.lime_experts[adapter].parameters()).device
            buffers += list(stats._buffers(device).values())
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
    # Summed over layers: counts (layer, token) pairs by number of selected experts.
    hist: list[float] = []
    for v in values:
        h = v.get("active_histogram", [])
        hist = [a + b for a, b in zip(hist + [0.0] * (len(h) - len(hist)), h + [0.0] * (len(hist) - len(h)))]
    out["active_histogram"] = hist
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


def set_routing_stats_enabled(model: nn.Module, enabled: bool) -> None:
    """Pause (False) or resume (True) the recording of routing statistics in every LiME layer of ``model``."""
    for _, layer in _lime_layers(model):
        for stats in layer.lime_stats.values():
            stats.enabled = bool(enabled)


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
