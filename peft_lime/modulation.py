"""The modulated update y = out + delta * (offset + mix @ W) as one autograd node that keeps little for backward.

Written with plain ops, autograd would save both (N, d) factors of the product: the modulation (for the gradient of
delta) and delta (for the gradients of mix, W and the offset), two activations per wrapped layer that plain LoRA does
not have (+22% peak training memory in the efficiency benchmark). Here the modulation is recomputed in backward from
the (N, E) mix (one small addmm), and for a low-rank delta (plain LoRA; see deltas.LowRankDelta) delta is recomputed
too, from the (N, r) hidden state and B: nothing of size (N, d) is saved at all. Outside autograd (inference, decoding) the plain ops run directly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .deltas import LowRankDelta


def _low_rank_delta(a: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """s * B a, in the output dtype: the same ops (and rounding) as PEFT's ``lora_B(a) * scaling``."""
    return (F.linear(a, B) * scaling).to(dtype)


class _Modulate(torch.autograd.Function):
    """y = out + delta * (offset + mix @ W); delta given (saved) or as low-rank factors (a, B, scaling), recomputed."""

    @staticmethod
    def forward(ctx, out, mix, weight, offset, delta, a, B, scaling):
        low_rank = delta is None
        if low_rank:
            delta = _low_rank_delta(a, B, scaling, out.dtype)
        modulation = torch.addmm(offset, mix, weight)
        # Computed in out's shape, not viewed into it: a custom Function's view output may not be modified in place,
        # and models do modify layer outputs in place (Falcon: mlp_output += attention_output).
        y = torch.addcmul(out, delta.reshape(out.shape), modulation.view(out.shape))
        ctx.low_rank, ctx.scaling, ctx.out_dtype = low_rank, scaling, out.dtype
        ctx.save_for_backward(mix, weight, offset, *((a, B) if low_rank else (delta,)))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        mix, weight, offset, *rest = ctx.saved_tensors
        d = grad_y.shape[-1]
        g = grad_y.reshape(-1, d)
        if ctx.low_rank:
            a, B = rest
            delta = _low_rank_delta(a, B, ctx.scaling, ctx.out_dtype).reshape(-1, d)
        else:
            delta = rest[0].reshape(-1, d)
        need = ctx.needs_input_grad
        grad_out = grad_y if need[0] else None
        grad_mix = grad_weight = grad_offset = grad_delta = grad_a = grad_B = None
        if need[1] or need[2] or need[3]:
            gm = g * delta
            grad_mix = gm @ weight.t() if need[1] else None
            grad_weight = mix.t() @ gm if need[2] else None
            grad_offset = gm.sum(0) if need[3] else None
            del gm
        if need[4] or need[5] or need[6]:
            gd = g * torch.addmm(offset, mix, weight)
            if not ctx.low_rank:
                grad_delta = gd.view(rest[0].shape)
            else:
                # Backward of (F.linear(a, B) * s).to(dtype), as autograd would run it.
                gd = gd.to(B.dtype) * ctx.scaling
                a2 = a.reshape(-1, a.shape[-1])
                grad_a = (gd @ B).view(a.shape) if need[5] else None
                grad_B = gd.t() @ a2 if need[6] else None
        return grad_out, grad_mix, grad_weight, grad_offset, grad_delta, grad_a, grad_B, None


def modulate(
    out: torch.Tensor,
    mix: torch.Tensor,
    weight: torch.Tensor,
    offset: torch.Tensor,
    *,
    delta: Optional[torch.Tensor] = None,
    low_rank: Optional[LowRankDelta] = None,
) -> torch.Tensor:
    """out + delta * (offset + mix @ weight), delta given or as low-rank factors. mix: (N, E) with N the number of
    tokens of out; weight: (E, d); offset: (d,); all in out's dtype (the factors in their own)."""
    a, B, scaling = low_rank if low_rank is not None else (None, None, 1.0)
    if torch.is_grad_enabled():
        return _Modulate.apply(out, mix, weight, offset, delta, a, B, scaling)
    if delta is None:
        delta = _low_rank_delta(a, B, scaling, out.dtype)
    modulation = torch.addmm(offset, mix, weight)
    return torch.addcmul(out, delta, modulation.view(delta.shape))
