"""LiME's default routing in training as two native CPU calls, forward and backward (csrc/lime_route.c).

In an eager training step the routing of one layer call (token-norm logits, jitter, softmax, Auto Top-K's soft gate
and the second softmax) is about thirty small tensor ops forward and as many backward, on (N, E) tensors: at 30
layers x 7 projections their dispatch, not their arithmetic, was most of LiME's train-step cost over plain LoRA
(uniform routing, which skips them, ran 0.93x LoRA's step against the default's 1.05x). Here the forward is one call
that writes probs, weights and each token's two logit scales, and the backward one call that maps the gradients of
weights and probs (the balance terms read probs) to those of the two routed slices.

Covered: the default selection only (soft Auto Top-K without ``max_active_experts``), ``routing_mode="token"``,
``routing_norm="token"``, n_gram 1 (no window), float32 contiguous plain CPU tensors
(the routed slices may be strided rows), E <= 64, not in torch.export or a jit trace (a compiled model calls the custom op of native_ops.py), no
torch.distributed process group. Everything else keeps routing.py's
torch ops, which are the reference the tests compare this with (probs, weights, every gradient and the loss at 1e-5,
jitter included: the noise is drawn by the same torch call on the same number of values, so the RNG stream does not
change). The switch is the native library's (``PEFT_LIME_NATIVE`` / ``native_route.set_native``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import torch

from . import native_route
from .native_low_rank import in_distributed_run
from .routing import _EPS, ADAPTER_SCALE_FLOOR


@lru_cache(maxsize=256)
def covers(s: Any) -> bool:
    """Whether routing settings ``s`` are the ones the training entries compute."""
    return (
        s.routing_mode == "token" and s.routing_norm == "token" and s.n_gram == 1 and s.ngram_mode != "prefix"
        and s.auto_topk and s.max_active_experts is None and s.selection == "soft"
        and s.num_experts <= native_route.MAX_EXPERTS
    )


def _rows(t: torch.Tensor, E: int) -> Optional[torch.Tensor]:
    """``t`` as (N, E) rows of unit column stride (a view where its layout allows), or None when it cannot be."""
    if not native_route.plain_float_cpu(t):
        return None
    rows = t.reshape(-1, E)
    return rows if rows.stride(-1) == 1 else None


def forward_kernel(
    h_rows: torch.Tensor, d_rows: torch.Tensor, noise: Optional[torch.Tensor], consts: tuple
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs, weights (N, E) and each token's two logit scales (N, 2) from the routed slices' (N, E) rows (unit
    column stride), through the forward entry. ``consts``: (E, c_h, c_d, floor2, threshold, inv_t)."""
    E, c_h, c_d, floor2, threshold, inv_t = consts
    N = h_rows.shape[0]
    probs, weights, scales = torch.empty(N, E), torch.empty(N, E), torch.empty(N, 2)
    native_route.train_kernels[0](
        h_rows.data_ptr(), h_rows.stride(0), d_rows.data_ptr(), d_rows.stride(0),
        None if noise is None else noise.data_ptr(), N, E, c_h, c_d, floor2, _EPS, threshold, inv_t,
        probs.data_ptr(), weights.data_ptr(), scales.data_ptr(), native_route.parallel_threads(N),
    )
    return probs, weights, scales


def backward_kernel(
    scales: torch.Tensor, noise: Optional[torch.Tensor], probs: torch.Tensor, weights: torch.Tensor,
    grad_weights: Optional[torch.Tensor], grad_probs: Optional[torch.Tensor], threshold: float, inv_t: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients (N, E) of the two routed slices for those of weights and probs (either may be None: zero)."""
    N, E = probs.shape
    grad_h, grad_d = torch.empty(N, E), torch.empty(N, E)
    grad_w = torch.zeros(N, E) if grad_weights is None else grad_weights.contiguous()
    grad_p = None if grad_probs is None else grad_probs.contiguous()
    native_route.train_kernels[1](
        scales.data_ptr(), None if noise is None else noise.data_ptr(), probs.data_ptr(), weights.data_ptr(),
        grad_w.data_ptr(), None if grad_p is None else grad_p.data_ptr(), N, E, threshold, inv_t,
        grad_h.data_ptr(), grad_d.data_ptr(), native_route.parallel_threads(N),
    )
    return grad_h, grad_d


class _NativeRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_rows, d_rows, noise, consts):
        probs, weights, scales = forward_kernel(h_rows, d_rows, noise, consts)
        # The logit scales, not the slices: nothing of the layer's (N, d) output is kept (it may be written in place).
        ctx.save_for_backward(scales, noise, probs, weights)
        ctx.consts = consts
        return probs, weights

    @staticmethod
    def backward(ctx, grad_probs, grad_weights):
        scales, noise, probs, weights = ctx.saved_tensors
        threshold, inv_t = ctx.consts[4:]
        return (*backward_kernel(scales, noise, probs, weights, grad_weights, grad_probs, threshold, inv_t), None, None)


def selected(probs: torch.Tensor, s: Any) -> torch.Tensor:
    """The experts Auto Top-K keeps (p >= threshold * max p), for the routing statistics: routing.select_experts'
    mask, from the native probs."""
    with torch.no_grad():
        return torch.sub(probs, probs.amax(-1, keepdim=True), alpha=s.auto_topk_threshold) >= 0


def route(
    s: Any, h_slice: torch.Tensor, delta_slice: torch.Tensor, training: bool
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(probs, weights), both (N, E), of the default routing through the native entries, or None where they do not
    apply (the caller runs routing.py's ops). ``training``: the layer's mode (jitter is drawn then)."""
    if not native_route._enabled or torch.jit.is_tracing():
        return None
    E = s.num_experts
    traced = torch.compiler.is_compiling()
    if traced:  # a compiled model: the same kernels as custom ops (native_ops.py), where they apply
        # covers' own function: dynamo traces it (a constant per settings object) rather than its cache.
        if not covers.__wrapped__(s) or not native_route.traced_native(h_slice, delta_slice):
            return None
        h_rows, d_rows = h_slice.reshape(-1, E), delta_slice.reshape(-1, E)
    else:
        if not covers(s) or in_distributed_run():  # see native_low_rank.in_distributed_run
            return None
        h_rows, d_rows = _rows(h_slice, E), _rows(delta_slice, E)
        if h_rows is None or d_rows is None or not native_route.available():
            return None
    noise = None
    if training and s.jitter_noise > 0:
        # routing.apply_jitter's draw: the same call on as many values, so the RNG stream is unchanged.
        noise = torch.empty(h_rows.shape[0], E).uniform_(1.0 - s.jitter_noise, 1.0 + s.jitter_noise)
    c_h, c_d = (1.0 - s.routing_gamma) / s.temperature, s.routing_gamma / s.temperature
    consts = (E, c_h, c_d, ADAPTER_SCALE_FLOOR**2, s.auto_topk_threshold, 1.0 / s.selection_temperature)
    if traced:
        probs, weights, _ = torch.ops.peft_lime.route_train(h_rows, d_rows, noise, *consts[1:])
        return probs, weights
    return _NativeRoute.apply(h_rows, d_rows, noise, consts)
