"""Trainer-independent load-balancing loss: its gradient is injected through the activations.

TRL's SFTTrainer rebuilds the loss from log-probs and ignores ``outputs.loss``, so adding the aux term there is
silently lost. Instead each LiME layer attaches its aux term to its routing weights (which its output is computed
from) with an identity autograd function whose backward also sends d(aux)/d(aux) = scale into the aux term's graph
(the pattern DeepSeek-MoE and Megatron use). Whatever loss the trainer backpropagates through the layer output, the
aux gradient arrives with it, once.
``scale`` is 1 / gradient-accumulation steps, so the aux term is averaged over micro-batches like the LM loss.
Under gradient checkpointing the function is part of the recomputed graph (reentrant) or of the original graph
(non-reentrant); either way its backward runs once per micro-batch.
"""

from __future__ import annotations

import torch


class _InjectAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activations: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        # A new tensor, not a view of the input: autograd forbids modifying a custom Function's view output in place
        # (its backward would be bypassed), and models do modify layer outputs in place (Falcon: mlp_output += ...).
        # The layer applies this to its (N, E) routing weights, so the copy is tiny.
        return activations.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux, ctx.scale), None


def inject_aux_loss(activations: torch.Tensor, aux: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity on ``activations``; on backward, ``scale * aux`` is added to whatever loss flows through them."""
    if not aux.requires_grad:
        return activations
    return _InjectAuxLoss.apply(activations, aux, scale)
