"""RoutingStats: the on-device accumulator of one LiME layer's routing statistics for one adapter.

Recording is a handful of in-place tensor ops per fold of several calls, with no host-device synchronisation;
``summary`` turns the sums into Python numbers (one sync). The model-level API (read, reset, pause, sum over ranks)
is in telemetry.py.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Optional

import torch

from . import native_stats
from .routing import normalized_entropy

# Capacity of the per-task usage table (task ids are small integers put in batches by the collator).
MAX_TASKS = 256
# Recording only keeps references to the call's (N, E) tensors and folds them into the sums in batches: about twenty
# small ops per fold instead of per layer call, which dominated cached decoding (one token per call). Bounds on what
# waits: tokens (memory: N x E floats each) and calls.
MAX_PENDING_TOKENS = 2048
MAX_PENDING_CALLS = 256
# Names of the sums, in a fixed order: sync_routing_stats flattens them in this order on every rank.
SUM_SHAPES = {
    "tokens": (),
    "calls": (),
    "entropy": (),
    "active": (),
    "probs": ("E",),
    "load": ("E",),
    "importance": (),
    "kl": (),
    "task_probs": ("T", "E"),
    "task_tokens": ("T",),
    # Tokens by number of selected experts (0..E): the Auto Top-K histogram.
    "active_hist": ("E+1",),
    # Tokens whose routing probabilities were not finite (left out of every other statistic).
    "nonfinite": (),
}


@lru_cache(maxsize=64)
def _layout(num_experts: int) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """(name -> (element offset, shape)) of every sum in one flat buffer, in SUM_SHAPES order, and its size."""
    sizes = {"E": num_experts, "E+1": num_experts + 1, "T": MAX_TASKS}
    layout, offset = {}, 0
    for name, shape in SUM_SHAPES.items():
        dims = tuple(sizes[s] for s in shape)
        layout[name] = (offset, dims)
        offset += math.prod(dims)
    return layout, offset


def sum_views(flat: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """The named sums as views of one flat float32 buffer (one tensor, which a compiled step's statistics op
    mutates: native_ops.record_routing_stats)."""
    return {
        name: flat[offset : offset + math.prod(dims)].view(dims)
        for name, (offset, dims) in _layout(num_experts)[0].items()
    }


@lru_cache(maxsize=64)
def sum_offsets(num_experts: int) -> dict[str, int]:
    """Element offset of every named sum in the flat buffer of ``sum_views``."""
    return {name: offset for name, (offset, _) in _layout(num_experts)[0].items()}


def flat_size(num_experts: int) -> int:
    """Elements of the flat buffer of ``sum_views``."""
    return _layout(num_experts)[1]


class RoutingStats:
    """Sums over all recorded tokens since the last reset (padding and non-finite rows excluded)."""

    def __init__(self, num_experts: int, device: Optional[torch.device] = None) -> None:
        self.num_experts = num_experts
        self._sums: Optional[dict[str, torch.Tensor]] = None
        self._flat: Optional[torch.Tensor] = None  # the storage of every sum (sum_views)
        # A training callback pauses recording between optimizer steps, so evaluation forwards made during training
        # do not mix into the training statistics (see ``telemetry.set_routing_stats_enabled``).
        self.enabled = True
        # Aux loss of the last training forward (detached), for ``get_aux_loss``.
        self.last_aux: Optional[torch.Tensor] = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        self._pending_tokens = 0
        # Created up front where the layer lives: a compiled step that created them while tracing would be traced
        # again on the next call (its guard "no sums yet" no longer holds).
        if device is not None and device.type != "meta":
            self._buffers(device)

    def reset(self) -> None:
        # Zeroed in place rather than dropped: a compiled graph that accumulates into these buffers keeps them.
        if self._flat is not None:
            self._flat.zero_()
        self._pending, self._pending_tokens = [], 0

    def sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The sum buffers (created as zeros on ``device`` when nothing was recorded yet); pending calls folded."""
        self._fold()
        return self._buffers(device)

    def _buffers(self, device: torch.device) -> dict[str, torch.Tensor]:
        # No fold here: a compiled step accumulates into these directly, and folding the calls an eager step left
        # pending from inside the graph would change the pending list the graph was traced with (a recompilation).
        if self._flat is None:
            self._flat = torch.zeros(flat_size(self.num_experts), dtype=torch.float32, device=device)
            self._sums = sum_views(self._flat, self.num_experts)
        elif self._flat.device != torch.device(device):  # the model moved since (e.g. .to("cuda"))
            self._flat = self._flat.to(device)
            self._sums = sum_views(self._flat, self.num_experts)
        return self._sums

    def record_aux(self, aux: torch.Tensor) -> None:
        self.last_aux = aux.detach()

    @torch.no_grad()
    def record(
        self,
        probs: torch.Tensor,
        selected: torch.Tensor,
        valid: Optional[torch.Tensor],
        token_tasks: Optional[torch.Tensor] = None,
    ) -> None:
        """probs / selected: (N, E); valid: (N,) bool or None; token_tasks: (N,) task id per token or None."""
        if not self.enabled:
            return
        entry = (probs.detach(), selected, valid, token_tasks)
        if torch.compiler.is_compiling():
            # Inside a compiled graph the sums are updated in place: no Python list or counter that would change (and
            # recompile) at every call. Where the native kernel applies, as one opaque op (native_stats.py).
            if token_tasks is None and native_stats.applies(probs, traced=True):
                self._buffers(probs.device)
                flat_valid = None if valid is None else valid.reshape(-1)
                torch.ops.peft_lime.record_routing_stats(self._flat, entry[0], selected, flat_valid)
            else:
                self._accumulate([entry])
            return
        self._pending.append(entry)
        self._pending_tokens += probs.shape[0]
        if self._pending_tokens >= MAX_PENDING_TOKENS or len(self._pending) >= MAX_PENDING_CALLS:
            self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        """Add the pending calls to the sums: one batch of ops for all of them, no host-device sync."""
        entries, self._pending, self._pending_tokens = self._pending, [], 0
        if entries:
            self._accumulate(entries)

    @torch.no_grad()
    def _accumulate(self, entries: list) -> None:
        """The statistics of ``entries`` (recorded calls) added to the sums."""
        E, K = self.num_experts, len(entries)
        probs = torch.cat([e[0].reshape(-1, E) for e in entries]).float()
        device, counts = probs.device, [e[0].numel() // E for e in entries]
        s = self._buffers(device)
        selected = torch.cat([e[1].reshape(-1, E) for e in entries])
        w = torch.cat(
            [e[2].reshape(-1).float() if e[2] is not None else probs.new_ones(n) for e, n in zip(entries, counts)]
        )
        tasks_recorded = any(e[3] is not None for e in entries)
        if not tasks_recorded and native_stats.applies(probs):  # the same sums in one native call
            native_stats.add(self._flat, sum_offsets(E), probs, selected, w, counts)
            return
        # A non-finite row (a diverged layer, an inf input) is counted and left out: one NaN would otherwise poison
        # every sum until the next reset.
        finite = torch.isfinite(probs).all(-1)
        s["nonfinite"] += (w * ~finite).sum()
        w = w * finite
        probs = torch.where(finite[:, None], probs, 0.0)
        # Call index of every token, for the per-call balance terms.
        if len(set(counts)) == 1:  # static shapes (the compiled path always records one call)
            call = torch.arange(K, device=device).repeat_interleave(counts[0])
        else:
            call = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
        pw = probs * w[:, None]
        per_call = torch.zeros(K, E + 1, device=device).index_add_(0, call, torch.cat([pw, w[:, None]], 1))
        # A call without a valid token (all padding) has no balance terms: it adds nothing and is not counted.
        has_tokens = per_call[:, E] > 0
        pbar = per_call[:, :E] / per_call[:, E:].clamp_min(1.0)
        s["importance"] += ((E * pbar.square().sum(-1) - 1.0) * has_tokens).sum()
        s["kl"] += (pbar * torch.log(pbar.clamp_min(1e-12) * E)).sum()
        s["calls"] += has_tokens.sum()
        s["tokens"] += w.sum()
        s["entropy"] += normalized_entropy(probs) @ w
        n_active = selected.sum(-1)
        s["active"] += n_active.float() @ w
        s["active_hist"].index_add_(0, n_active.reshape(-1).long(), w)
        s["probs"] += pw.sum(0)
        s["load"] += w @ selected.float()
        if tasks_recorded:
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
        """Python numbers (one device sync); None when nothing was recorded since the last reset."""
        self._fold()
        if self._sums is None:
            return None
        s = {k: v.cpu() for k, v in self._sums.items()}
        if not (s["tokens"] or s["calls"] or s["nonfinite"]):
            return None
        tokens = max(float(s["tokens"]), 1.0)
        calls = max(float(s["calls"]), 1.0)
        load = s["load"] / tokens
        usage = load / load.sum().clamp_min(1e-12)
        seen = torch.nonzero(s["task_tokens"] > 0).flatten()
        return {
            "tokens": float(s["tokens"]),
            "nonfinite_tokens": float(s["nonfinite"]),
            "routing_entropy": float(s["entropy"]) / tokens,
            "active_experts": float(s["active"]) / tokens,
            "mean_probs": (s["probs"] / tokens).tolist(),
            "load": usage.tolist(),
            "load_imbalance": float(usage.max() / usage.mean().clamp_min(1e-12)),
            "importance_loss": float(s["importance"]) / calls,
            "kl_loss": float(s["kl"]) / calls,
            "task_usage": {int(t): (s["task_probs"][t] / s["task_tokens"][t]).tolist() for t in seen},
            "task_tokens": {int(t): float(s["task_tokens"][t]) for t in seen},
            "active_histogram": s["active_hist"].tolist(),
        }
