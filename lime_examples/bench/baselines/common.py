"""Pieces shared by the baseline adapters: LoRA initialisation, a LoRA linear wrapper, module replacement and the
Mixtral-style load-balancing loss.

Adapter parameters are kept in float32 whatever the base dtype (as PEFT does with ``autocast_adapter_dtype``);
the adapter path runs in float32 and its output is cast back to the base output's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def init_lora_(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int = 1) -> None:
    """PEFT's default LoRA init, per expert: A ~ kaiming_uniform(a=sqrt(5)) on each (r x d_in) block, B = 0.

    ``lora_A`` is (E * r, d_in) or (E, r, d_in): each expert's block gets the fan-in of one LoRA A.
    """
    with torch.no_grad():
        for block in lora_A.reshape(num_experts, -1, lora_A.shape[-1]):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        lora_B.zero_()


def load_balance_loss(probs: torch.Tensor, top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Mixtral / Switch load-balancing loss: E * sum_i f_i * P_i.

    probs: (N, E) router softmax; top_idx: (N, k) selected experts. f_i is the fraction of (token, slot) pairs
    routed to expert i (per top-k slot, as in transformers' ``load_balancing_loss_func``), P_i the mean router
    probability of expert i. Equals 1 (times k) for a perfectly balanced router.
    """
    mask = F.one_hot(top_idx, num_experts).to(probs.dtype)  # (N, k, E)
    tokens_per_expert = mask.mean(0)  # (k, E)
    prob_per_expert = probs.mean(0)  # (E,)
    return num_experts * (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum()


class LoraLinear(nn.Module):
    """y = W x + (alpha / r) * B A x around a frozen ``nn.Linear`` (no dropout, as PEFT's default)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, dtype=torch.float32, device=base.weight.device))
        init_lora_(self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return h + delta.to(h.dtype)


def replace_linears(model: nn.Module, names: Iterable[str], factory: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every ``nn.Linear`` whose attribute name is in ``names`` by ``factory(linear)``; returns the count."""
    wanted = set(names)
    found = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if child_name in wanted and type(child) is nn.Linear
    ]
    for parent, child_name, child in found:
        setattr(parent, child_name, factory(child))
    return len(found)


class AuxLossCollector:
    """Mean over MoE modules of the load-balancing loss each stored in its ``aux_loss`` during the last forward."""

    def __init__(self, model: nn.Module, coef: float) -> None:
        self.modules = [m for m in model.modules() if hasattr(m, "aux_loss")]
        self.coef = coef

    def __call__(self) -> Optional[torch.Tensor]:
        losses = [m.aux_loss for m in self.modules if m.aux_loss is not None]
        for m in self.modules:
            m.aux_loss = None
        if not losses:
            return None
        return self.coef * torch.stack(losses).mean()
