"""LiME over a low-rank adapter (plain LoRA) as ONE matrix product: y = out + s * (a (x) mix) @ M.

For a low-rank delta = s * a @ B.T (a: (N, r), B: (d, r)) and mixing weights that sum to 1 per token, the
modulated update is a sum over rank r and expert e:

    delta * (offset + mix @ W) = s * sum_{r,e} a[:, r] mix[:, e] * B[:, r] P[e, :],   P = W + offset

(the offset moves into the experts because sum_e mix[:, e] = 1). With z = a (x) mix (N, r E, the per-token outer
product) and M[(r, e), :] = B[:, r] * P[e, :] (r E, d), that is ``addmm(out, z, M, alpha=s)``: one GEMM with an
inner size of r E (64 for r = E = 8) replaces LoRA's up-projection, the (N, d) modulation and the two (N, d)
element-wise products. Element-wise passes over (N, d) are memory-bound; a K = 64 GEMM over the same output is
compute-bound and cheap, so this costs about what plain LoRA's up-projection + add cost once the (N, d) output no
longer fits in cache (see ``use_low_rank_mix``). Its backward is two GEMMs (g @ M.T, z.T @ g) and small (N, r E) /
(r E, d) reductions; only a, mix, B and the experts W + offset are kept for it (z and M are rebuilt: r E x d per
layer would otherwise stay alive for every layer until backward).

On float32 CPU tensors in eager mode, forward and backward go to native loops instead (native_low_rank.py): the
same function with r + E instead of r E multiply-adds per output value; these torch ops remain the reference (tests
compare the two at 1e-5) and the path for every other device and dtype. A torch.compile'd model calls the same
kernels as custom ops (native_ops.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import native_low_rank, native_route

# Below this many output elements (N x d) the (N, d) element-wise passes stay in cache and the plain modulation
# (modulation.py) is cheaper than building M (r E x d) for a GEMM: decoding and short calls take that path.
LOW_RANK_MIX_MIN_ELEMENTS = 1 << 18


def use_low_rank_mix(n_tokens: int, width: int) -> bool:
    """Whether a call of ``n_tokens`` tokens on an output of ``width`` features takes the single-GEMM path."""
    return n_tokens * width >= LOW_RANK_MIX_MIN_ELEMENTS


def _mix_matrix(B: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """M (r E, d) with M[(r, e)] = B[:, r] * experts[e]; B: (d, r), experts: (E, d)."""
    r, (E, d) = B.shape[1], experts.shape
    # B.t() made contiguous first (r x d, small): with a transposed operand the broadcast product would come out in
    # a d-major layout, and the reshape would then copy all r E d values.
    return (B.t().contiguous().unsqueeze(1) * experts.unsqueeze(0)).view(r * E, d)


def _outer(a: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """z (N, r E) with z[:, (r, e)] = a[:, r] * mix[:, e]."""
    return (a.unsqueeze(-1) * mix.unsqueeze(-2)).reshape(a.shape[0], -1)


def _add_mix(out: torch.Tensor, z: torch.Tensor, M: torch.Tensor, scaling: float, inplace: bool) -> torch.Tensor:
    d = out.shape[-1]
    if inplace:
        out.view(-1, d).addmm_(z, M, alpha=scaling)  # the GEMM accumulates into out: no (N, d) copy of it
        return out
    # Written into a tensor of out's shape, not viewed into it: a custom Function's view output may not be modified
    # in place, and models do modify layer outputs in place (Falcon: mlp_output += attention_output).
    y = out.new_empty(out.shape)
    torch.addmm(out.reshape(-1, d), z, M, alpha=scaling, out=y.view(-1, d))
    return y


def _forward(out: torch.Tensor, a: torch.Tensor, mix: torch.Tensor, B: torch.Tensor, experts: torch.Tensor,
             scaling: float, inplace: bool) -> torch.Tensor:
    # The native loop where it applies (float32 CPU, eager): a quarter of the GEMM's arithmetic (native_low_rank.py).
    y = native_low_rank.forward(out, a, mix, B, experts, scaling, inplace)
    return y if y is not None else _add_mix(out, _outer(a, mix), _mix_matrix(B, experts), scaling, inplace)


class _LowRankMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, a, mix, B, weight, offset, scaling, inplace):
        experts = weight + offset
        y = _forward(out, a, mix, B, experts, scaling, inplace)
        if inplace:
            ctx.mark_dirty(out)
        ctx.scaling = scaling
        ctx.save_for_backward(a, mix, B, experts)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        a, mix, B, experts = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad_y.reshape(-1, B.shape[0])
        if g.dtype != a.dtype:
            g = g.to(a.dtype)
        grads = native_low_rank.backward(g, a, mix, B, experts, ctx.scaling)
        if grads is None:
            grads = _torch_backward(g, a, mix, B, experts, ctx.scaling, need=(need[1], need[2], need[3], need[4] or need[5]))
        grad_a, grad_mix, grad_B, grad_experts = grads
        return (grad_y if need[0] else None, grad_a if need[1] else None, grad_mix if need[2] else None,
                grad_B if need[3] else None, grad_experts if need[4] else None,
                grad_experts.sum(0) if need[5] else None, None, None)


def _torch_backward(
    g: torch.Tensor, a: torch.Tensor, mix: torch.Tensor, B: torch.Tensor, experts: torch.Tensor, s: float,
    need: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> tuple[Optional[torch.Tensor], ...]:
    """The gradients of a, mix, B and experts (None where ``need`` says not) for g = grad of y as (N, d), with
    torch ops: the reference of the native backward."""
    (N, r), E, d = a.shape, mix.shape[1], B.shape[0]
    grad_a = grad_mix = grad_B = grad_experts = None
    if need[0] or need[1]:
        gz = torch.mm(g, _mix_matrix(B, experts).t()).mul_(s).view(N, r, E)
        grad_a = torch.bmm(gz, mix.unsqueeze(-1)).view(N, r) if need[0] else None
        grad_mix = torch.bmm(a.unsqueeze(1), gz).view(N, E) if need[1] else None
    if need[2] or need[3]:
        gm = torch.mm(_outer(a, mix).t(), g).mul_(s).view(r, E, d)  # gradient of M, (r, E, d)
        grad_B = (gm * experts.unsqueeze(0)).sum(1).t() if need[2] else None
        grad_experts = (gm * B.t().unsqueeze(1)).sum(0) if need[3] else None
    return grad_a, grad_mix, grad_B, grad_experts


def low_rank_mix(
    out: torch.Tensor,
    a: torch.Tensor,
    mix: torch.Tensor,
    B: torch.Tensor,
    weight: torch.Tensor,
    offset: torch.Tensor,
    scaling: float,
    inplace: bool = False,
) -> torch.Tensor:
    """out + s * (a @ B.T) * (mix @ (weight + offset)) as one GEMM (see the module docstring).

    out: (..., d) with N tokens; a: (N, r); mix: (N, E); B: (d, r); weight: (E, d); offset: (d,); all in one dtype.
    ``inplace``: accumulate into ``out`` (eager only; the caller guarantees that nothing reads ``out`` afterwards).
    This is LiME's out + delta * (offset + mix @ weight) when the rows of mix sum to 1, which every routing mode
    guarantees. Off the simplex the two differ by delta * offset * (sum(mix) - 1), so the gradient with respect to
    mix differs from the written formula's by the same constant for every expert of a token; the softmax or
    u / sum(u) that makes mix cancels such a constant, so the gradients reaching the router are exactly LiME's.
    """
    # In place only in eager mode, on a contiguous out that nothing else reads afterwards (the caller knows).
    inplace = inplace and out.is_contiguous() and not torch.compiler.is_compiling()
    if native_route.traced_native(out, a, mix, B, weight):  # a compiled model: the kernel as a custom op (native_ops.py)
        return torch.ops.peft_lime.low_rank_mix(out, a, mix, B, weight + offset, scaling)
    if torch.is_grad_enabled():
        return _LowRankMix.apply(out, a, mix, B, weight, offset, scaling, inplace)
    return _forward(out, a, mix, B, weight + offset, scaling, inplace)
