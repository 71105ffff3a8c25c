"""LimeExperts: the expert vectors of one adapter in one layer, and their modulation of the adapter output."""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch import nn

from .deltas import LowRankDelta
from .low_rank_mix import low_rank_mix, use_low_rank_mix
from .modulation import modulate


class LimeExperts(nn.Module):
    """Expert vectors of one adapter in one layer: a leaf module with a ``.weight``, read only in its forward.

    FSDP's PEFT auto-wrap policy wraps leaf modules whose ``.weight`` requires grad, so the experts are sharded and
    gathered as a unit; reading them only here keeps FSDP2 from meeting a sharded tensor in the parent's code.
    ``weight`` stores P - 1 (the deviation from 1), not P: vectors near 1.0 in bf16 (as TRL casts trainable
    parameters of quantized models) would lose every update smaller than 1/256, deviations near 0 do not.
    """

    def __init__(
        self,
        num_experts: int,
        width: int,
        shared_expert: bool,
        init_std: float,
        seed: Optional[int] = None,
        num_tasks: Optional[int] = None,
        centroids: bool = False,
    ) -> None:
        super().__init__()
        self.init_std = init_std
        self.seed = seed
        self.weight = nn.Parameter(torch.empty(num_experts, width, dtype=torch.float32))
        if shared_expert:
            self.shared = nn.Parameter(torch.empty(width, dtype=torch.float32))
            self.gate = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        else:
            self.register_parameter("shared", None)
            self.register_parameter("gate", None)
        # Oracle ablation routing_mode="task_learned" only: one learned mix per task (logits, init 0 = uniform).
        if num_tasks is not None:
            self.task_logits = nn.Parameter(torch.zeros(num_tasks, num_experts, dtype=torch.float32))
        else:
            self.register_parameter("task_logits", None)
        # routing_mode="centroid" only: fixed (not trained) routing centroids of the frozen output, and its mean.
        # Zeros until peft_lime.fit_routing_centroids fills them (all logits 0 then: uniform routing).
        if centroids:
            self.register_buffer("centroids", torch.zeros(num_experts, width, dtype=torch.float32))
            self.register_buffer("centroid_center", torch.zeros(width, dtype=torch.float32))
        else:
            self.centroids = self.centroid_center = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Created on the meta device (low_cpu_mem_usage loading): nothing to initialise, the checkpoint fills it.
        if self.weight.is_meta:
            return
        # A private generator (when a seed is given) leaves the global RNG where the base tuner expects it: LiME over
        # LoRA then initialises exactly the LoRA weights plain LoRA gets with the same seed, which makes side-by-side
        # comparisons fair and lets a user switch methods without changing the adapter's starting point.
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=self.weight.device).manual_seed(self.seed)
        with torch.no_grad():
            self.weight.uniform_(-self.init_std, self.init_std, generator=generator)
            if self.shared is not None:
                self.shared.normal_(0.0, self.init_std, generator=generator)
                self.gate.zero_()
            if self.task_logits is not None:
                self.task_logits.zero_()

    def _offset(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """1 + g * p_s, shape (d,): one addcmul when the experts' dtype is the compute dtype (decoding pays per op)."""
        if self.shared is None:
            return torch.ones((), dtype=dtype, device=device).expand(self.weight.shape[1])
        if self.shared.dtype == dtype:
            return torch.addcmul(_one(dtype, device), self.gate, self.shared)
        return (self.gate * self.shared).to(dtype) + 1.0

    def forward(
        self,
        mix: torch.Tensor,
        out: Optional[torch.Tensor] = None,
        delta: Optional[torch.Tensor] = None,
        low_rank: Optional[LowRankDelta] = None,
        inplace: bool = False,
    ) -> torch.Tensor:
        """mix: (N, E) weights summing to 1 per row -> modulation (N, d) = 1 + mix @ (P - 1) + g * p_s.

        With ``out`` (and ``delta``, or its low-rank factors) returns the modulated update out + delta * modulation
        instead, as one memory-lean autograd node (see modulation.py); ``inplace`` lets the single-GEMM path
        accumulate into ``out`` (the caller knows nothing reads it afterwards).
        """
        dtype = mix.dtype
        offset = self._offset(dtype, mix.device)
        weight = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        if out is None:
            return torch.addmm(offset, mix, weight)
        if low_rank is not None and use_low_rank_mix(mix.shape[0], out.shape[-1]):
            # One GEMM for the whole modulated update (low_rank_mix.py), in the output's dtype.
            a, B, scaling = low_rank
            a = a.reshape(-1, a.shape[-1])
            if a.dtype != dtype:
                a, B = a.to(dtype), B.to(dtype)
            return low_rank_mix(out, a, mix, B, weight, offset, scaling, inplace=inplace)
        return modulate(out, mix, weight, offset, delta=delta, low_rank=low_rank)


_ONES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _one(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant 0-d 1.0 per dtype and device (never written to)."""
    if torch.compiler.is_compiling():  # a constant in the graph; filling the cache while tracing would recompile
        return torch.ones((), dtype=dtype, device=device)
    key = (dtype, device)
    if key not in _ONES:
        _ONES[key] = torch.ones((), dtype=dtype, device=device)
    return _ONES[key]


def expert_seed(layer_name: str, adapter_name: str) -> int:
    """Seed of one layer's expert init: follows the user's torch.manual_seed, differs per layer and adapter."""
    return (torch.initial_seed() + zlib.crc32(f"{layer_name}/{adapter_name}".encode())) % (2**63)
