"""MixLoRA baseline (Li et al., 2024), re-implemented as plain modules, following the forward of the pip package
``mixlora`` 0.2.3 (``MixLoraSparseMoe._llama_forward``) operation for operation.

- attention q/k/v/o: one plain LoRA each;
- FFN: a top-k mixture of E "experts" that all share the frozen gate/up/down weights and differ by a LoRA on each of
  gate/up/down; a bias-free learned router hidden -> E (init N(0, 0.02^2)); routing weights = renormalised top-k of
  the softmax. The frozen gate/up projections are computed once for all tokens; each expert then gathers its tokens,
  adds its LoRA terms, applies the activation, runs the frozen down projection plus its LoRA on its own tokens and
  scatters the weighted result back (index_add_), exactly as the package does;
- Mixtral-style load-balancing loss on the router (coefficient 0.001, the package's ``router_aux_loss_coef``).

Expert weights are stacked per projection (A: (E, r, d_in), B: (E, d_out, r)); expert e's LoRA is (A[e], B[e]).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import AuxLossCollector, LoraLinear, init_lora_, load_balance_loss, replace_linears

ROUTER_INIT_STD = 0.02
AUX_LOSS_COEF = 0.001
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


class MixLoraMLP(nn.Module):
    """Replaces a Llama MLP (gate/up/down + activation) by MixLoRA's sparse mixture of LoRA experts."""

    def __init__(self, mlp: nn.Module, r: int, alpha: float, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.mlp = mlp  # frozen gate_proj / up_proj / down_proj / act_fn
        self.r, self.num_experts, self.top_k = r, num_experts, top_k
        self.scaling = alpha / r
        device = mlp.gate_proj.weight.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in FFN:
            lin = getattr(mlp, name)
            A = torch.empty(num_experts, r, lin.in_features, dtype=torch.float32, device=device)
            B = torch.empty(num_experts, lin.out_features, r, dtype=torch.float32, device=device)
            init_lora_(A, B, num_experts)
            self.lora_A[name], self.lora_B[name] = nn.Parameter(A), nn.Parameter(B)
        hidden = mlp.gate_proj.in_features
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=torch.float32, device=device)
        nn.init.normal_(self.router.weight, std=ROUTER_INIT_STD)
        self.aux_loss: Optional[torch.Tensor] = None

    def _lora(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A[name][expert]), self.lora_B[name][expert]) * self.scaling

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        dtype = self.router.weight.dtype
        x = hidden_states.reshape(-1, shape[-1])
        xa = x.to(dtype)
        probs = torch.softmax(self.router(xa), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        if self.training and torch.is_grad_enabled():
            self.aux_loss = load_balance_loss(probs, top_i, self.num_experts)
        common_gate = self.mlp.gate_proj(x).to(dtype)
        common_up = self.mlp.up_proj(x).to(dtype)
        out = torch.zeros(x.shape[0], shape[-1], dtype=dtype, device=x.device)
        expert_mask = F.one_hot(top_i, self.num_experts).permute(2, 1, 0)  # (E, k, N)
        for e in range(self.num_experts):
            slot, tokens = torch.where(expert_mask[e])
            xe = xa[tokens]
            gate = common_gate[tokens] + self._lora("gate_proj", e, xe)
            up = common_up[tokens] + self._lora("up_proj", e, xe)
            act = self.mlp.act_fn(gate) * up
            down = self.mlp.down_proj(act.to(hidden_states.dtype)).to(dtype) + self._lora("down_proj", e, act)
            out.index_add_(0, tokens, down * top_w[tokens, slot, None])
        return out.reshape(shape).to(hidden_states.dtype)


def apply_mixlora(model: nn.Module, r: int, alpha: float, num_experts: int = 8, top_k: int = 2) -> AuxLossCollector:
    """Freeze ``model``; LoRA on attention q/k/v/o and MixLoRA experts on every Llama-style MLP."""
    model.requires_grad_(False)
    n_attn = replace_linears(model, ATTENTION, lambda lin: LoraLinear(lin, r, alpha))
    mlps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if all(isinstance(getattr(child, p, None), nn.Linear) for p in FFN) and hasattr(child, "act_fn")
    ]
    for parent, name, child in mlps:
        setattr(parent, name, MixLoraMLP(child, r, alpha, num_experts, top_k))
    if n_attn == 0 or not mlps:
        raise ValueError("MixLoRA needs Llama-style attention projections and MLPs (gate/up/down_proj, act_fn)")
    return AuxLossCollector(model, AUX_LOSS_COEF)
