"""LiME's low-rank modulated update and its backward as native CPU calls (csrc/lime_low_rank.c).

low_rank_mix.py writes y = out + s * (a @ B.T) * (mix @ P) as ONE GEMM with an inner size of r E: a quarter of it
is LoRA's own up-projection, the rest (7 / 8 for r = E = 8) is LiME's extra arithmetic, about 9% of the frozen
GEMMs of a SmolLM2-sized model, which is most of LiME's eval-forward cost over LoRA (benchmarks/layer_ops.py). The
native loop makes each output row from r + E rows (a quarter of that arithmetic) in registers, with one read of
out and one write of y, and its backward recomputes both (N, d) factors per tile: the gradients of a, mix, B and P
from grad_y in one pass, where torch needs two r E GEMMs plus reductions.

It runs where it is exact and safe, otherwise the callers keep their torch ops (which tests compare it with, 1e-5):
the native library loaded (native_route.available), its switch on (``PEFT_LIME_NATIVE`` / ``set_native``, shared
with the decoding kernel), float32 contiguous plain CPU tensors (no DTensor or other subclass), r and E <= 64, not
inside torch.export or a jit trace (a torch.compile'd model calls it as a custom op, native_ops.py), no
torch.distributed process group (in_distributed_run). Tokens are split over torch's intra-op thread count.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import native_route

MAX_FACTORS = 64  # MAX_FACTORS in csrc/lime_low_rank.c: per-token partial sums live on the stack


def in_distributed_run() -> bool:
    """Whether a torch.distributed process group is up. The training-time native paths stand aside then: under FSDP2
    the saved parameters are storages FSDP frees and refills between forward and backward, and 2 of about 40 FSDP2
    test runs with these paths on aborted a rank ("terminate called without an active exception"; 0 of about 40
    without them; cause not found), so distributed runs keep the torch ops until it is."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _usable(*tensors: torch.Tensor) -> bool:
    if not native_route._enabled or torch.compiler.is_compiling() or torch.jit.is_tracing() or in_distributed_run():
        return False
    if not all(native_route.plain_float_cpu(t) and t.is_contiguous() for t in tensors):
        return False
    return native_route.available()


def forward(
    out: torch.Tensor, a: torch.Tensor, mix: torch.Tensor, B: torch.Tensor, experts: torch.Tensor, scaling: float,
    inplace: bool,
) -> Optional[torch.Tensor]:
    """out + s * (a @ B.T) * (mix @ experts) (into ``out`` itself when ``inplace``), or None where the native call
    does not apply. out: (..., d) with N tokens; a: (N, r); mix: (N, E); B: (d, r); experts: (E, d)."""
    (N, r), E, d = a.shape, mix.shape[-1], out.shape[-1]
    if r > MAX_FACTORS or E > MAX_FACTORS or out.numel() != N * d:
        return None
    # The small operands are packed here ((N, r + E) and (r + E, d) values); out must already be (it may be written).
    a, mix, BT, experts = a.contiguous(), mix.contiguous(), B.t().contiguous(), experts.contiguous()
    if not _usable(out, a, mix, BT, experts):
        return None
    y = out if inplace else torch.empty_like(out)
    status = native_route.low_rank_kernels[0](
        a.data_ptr(), mix.data_ptr(), BT.data_ptr(), experts.data_ptr(), out.data_ptr(), y.data_ptr(), N, r, E, d,
        scaling, torch.get_num_threads(),
    )
    return y if status == 0 else None


def backward(
    grad_y: torch.Tensor, a: torch.Tensor, mix: torch.Tensor, B: torch.Tensor, experts: torch.Tensor, scaling: float
) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The gradients (of a, mix, B, experts) of ``forward``'s y for ``grad_y``, or None where the native call does
    not apply."""
    (N, r), E, d = a.shape, mix.shape[-1], B.shape[0]
    if grad_y.dtype != torch.float32 or grad_y.numel() != N * d:
        return None
    if r > MAX_FACTORS or E > MAX_FACTORS:
        return None
    g, a, mix = grad_y.reshape(N, d).contiguous(), a.contiguous(), mix.contiguous()
    BT, experts = B.t().contiguous(), experts.contiguous()
    if not _usable(g, a, mix, BT, experts):
        return None
    grad_a, grad_mix = torch.empty_like(a), torch.empty_like(mix)
    grad_BT, grad_experts = torch.empty_like(BT), torch.empty_like(experts)
    status = native_route.low_rank_kernels[1](
        a.data_ptr(), mix.data_ptr(), BT.data_ptr(), experts.data_ptr(), g.data_ptr(), grad_a.data_ptr(),
        grad_mix.data_ptr(), grad_BT.data_ptr(), grad_experts.data_ptr(), N, r, E, d, scaling,
        torch.get_num_threads(),
    )
    return (grad_a, grad_mix, grad_BT.t(), grad_experts) if status == 0 else None
