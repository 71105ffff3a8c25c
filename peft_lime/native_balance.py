"""LiME's micro-batch balance loss of one layer call as one native CPU call forward and one backward
(csrc/lime_stats.c).

The default balance (``balance_scope="micro_batch"``) adds (c_imp * importance + c_kl * kl) / layers to the loss at
every wrapped layer call, from the mean routing probabilities of the call's valid tokens (routing.balance_terms).
As tensor ops that is about twenty small ops forward and as many backward per layer call: in an eager step their
dispatch, and in a compiled one the code inductor generates and compiles for them (about a fifth of LiME's graph
beyond LoRA's). Here the forward is one call (the mean and both terms) and the backward one call (the gradient of
every probability), with the formulas autograd derives from routing.py's ops; the tests compare both at 1e-5.

Covered: float32 plain CPU probabilities, 1 <= N tokens, E <= 64, the native switch on and the library loaded, no
torch.distributed process group (native_low_rank.in_distributed_run), not inside torch.export or a jit trace. A
compiled model calls the custom ops ``peft_lime::balance_aux`` / ``balance_aux_backward`` (native_ops.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import native_route, routing
from .native_low_rank import in_distributed_run


def forward_kernel(probs: torch.Tensor, w: Optional[torch.Tensor], consts: tuple[float, float, float]) -> torch.Tensor:
    """(aux, importance, kl) as a float32 (3,) tensor; probs (N, E) and w (N,) contiguous float32 (w None: all)."""
    out = torch.empty(3)
    N, E = probs.shape
    native_route.balance_kernels[0](probs.data_ptr(), None if w is None else w.data_ptr(), N, E, *consts,
                                    out.data_ptr())
    return out


def backward_kernel(
    probs: torch.Tensor, w: Optional[torch.Tensor], consts: tuple[float, float, float], grad_aux: float
) -> torch.Tensor:
    """The gradient (N, E) of the probabilities for ``grad_aux``, the gradient of aux."""
    grad = torch.empty_like(probs)
    N, E = probs.shape
    native_route.balance_kernels[1](probs.data_ptr(), None if w is None else w.data_ptr(), N, E, *consts,
                                    grad_aux, grad.data_ptr())
    return grad


class _NativeBalance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs, w, consts):
        ctx.save_for_backward(probs, w)
        ctx.consts = consts
        return forward_kernel(probs, w, consts)[0]

    @staticmethod
    def backward(ctx, grad_aux):
        probs, w = ctx.saved_tensors
        return backward_kernel(probs, w, ctx.consts, float(grad_aux)), None, None


def micro_batch_aux(
    probs: torch.Tensor, valid: Optional[torch.Tensor], importance_coef: float, kl_coef: float, layers: int
) -> torch.Tensor:
    """The balance loss (c_imp * importance + c_kl * kl) / layers of one layer call: through the kernels where they
    apply, else routing.balance_terms' ops. probs: (N, E); valid: (N,) bool or None (every token)."""
    native = _native_aux(probs, valid, importance_coef, kl_coef, layers)
    if native is not None:
        return native
    importance, kl, _ = routing.balance_terms(probs, valid)
    return (importance_coef * importance + kl_coef * kl) / layers


def _native_aux(
    probs: torch.Tensor, valid: Optional[torch.Tensor], importance_coef: float, kl_coef: float, layers: int
) -> Optional[torch.Tensor]:
    """The balance loss (c_imp * importance + c_kl * kl) / layers of probs (N, E) over its valid tokens (valid: (N,)
    bool or None) through the kernels, or None where they do not apply (the caller runs routing.balance_terms)."""
    E = probs.shape[-1]
    if not native_route._enabled or torch.jit.is_tracing() or E > native_route.MAX_EXPERTS:
        return None
    traced = torch.compiler.is_compiling()
    rows = probs.reshape(-1, E)
    if rows.shape[0] == 0:
        return None
    if traced:
        if not native_route.traced_native(probs):
            return None
    elif in_distributed_run() or not (native_route.plain_float_cpu(probs) and native_route.available()):
        return None
    w = None if valid is None else valid.reshape(-1).to(torch.float32)
    consts = (float(importance_coef), float(kl_coef), 1.0 / layers)
    if traced:
        return torch.ops.peft_lime.balance_aux(rows, w, *consts)
    return _NativeBalance.apply(rows.contiguous(), None if w is None else w.contiguous(), consts)
