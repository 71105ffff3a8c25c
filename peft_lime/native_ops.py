"""LiME's native CPU kernels as torch.library custom ops, so that a torch.compile'd model runs them too.

Eager calls reach the kernels through ctypes (native_route.py, native_low_rank.py, native_train_route.py). Dynamo
cannot trace a ctypes call, so a compiled model used to hold routing.py's torch ops instead: inductor compiled about
thirty routing ops forward and as many backward per wrapped layer, which made LiME's compile take 4.7x LoRA's, and
its generated loops ran slower than the kernels (compiled train step 1.057x, static-cache decoding 1.121x LoRA's at
8 layers, benchmarks/results/efficiency.md of commit dcfcebe). As custom ops the kernels are single, opaque nodes of
the graph: a fake implementation gives the compiler shapes, an autograd formula gives it a backward that is again
one op, and inductor neither traces nor fuses what is inside.

Ops (namespace ``peft_lime``), each the kernel of the module named:
- ``low_rank_mix`` / ``low_rank_mix_backward``: y = out + s (a @ B.T) * (mix @ P) (native_low_rank.py);
- ``route_train`` / ``route_train_backward``: the default routing, differentiable (native_train_route.py);
- ``route_weights``: the mixing weights of a no-grad call (native_route.weights);
- ``route_modulate``: routing and modulation of a no-grad call, i.e. decoding (native_route.modulate);
- ``record_routing_stats``: a layer call's routing statistics added to its sums in place (native_stats.py);
- ``balance_aux`` / ``balance_aux_backward``: the micro-batch balance loss of a layer call (native_balance.py).

Where a compiled model uses them is decided while dynamo traces (native_route.traced_native): the native switch on,
float32 CPU tensors, the library loaded, no torch.distributed process group, and not torch.export (an exported
program must not depend on this process's library). The callers' conditions (routing settings, shapes) are the
eager ones; hard selection is left out, because its kernel may decline a call (a tie at the cut). The low-rank ops
fall back to their torch formula where the kernel declines (r or E > 64); the routing ops are only traced where
their kernels cannot decline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from . import native_balance, native_low_rank, native_route, native_stats, native_train_route
from .stats import sum_offsets

_NS = "peft_lime"
OPS = torch.ops.peft_lime
# Defined through torch.library.Library, not torch.library.custom_op: the latter's Python wrapper doubled the cost of
# a call (20.6 vs 9.9 us for route_modulate on one token, against 4.6 us for the kernel through ctypes), which a
# compiled decoding step pays once per wrapped layer and token. The kernels are CPU-only: so is the registration.
_LIB = torch.library.Library(_NS, "FRAGMENT")


def _op(schema: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Define ``peft_lime::<schema>`` with the decorated function as its CPU kernel (returned unchanged)."""

    def define(kernel: Callable[..., Any]) -> Callable[..., Any]:
        _LIB.define(schema)
        _LIB.impl(schema.split("(", 1)[0], kernel, "CPU")
        return kernel

    return define


# --- low-rank modulation -----------------------------------------------------------------------------------------
@_op(
    "low_rank_mix(Tensor out, Tensor a, Tensor mix, Tensor B, Tensor experts, float scaling) -> Tensor"
)
def low_rank_mix(out: Tensor, a: Tensor, mix: Tensor, B: Tensor, experts: Tensor, scaling: float) -> Tensor:
    """out + scaling * (a @ B.T) * (mix @ experts), a new tensor of out's shape."""
    from .low_rank_mix import _forward  # its torch formula, where the kernel declines (that module imports this one)

    return _forward(out.contiguous(), a, mix, B, experts, scaling, False)


@torch.library.register_fake(OPS.low_rank_mix.default)
def _(out: Tensor, a: Tensor, mix: Tensor, B: Tensor, experts: Tensor, scaling: float) -> Tensor:
    return out.new_empty(out.shape)


@_op(
    "low_rank_mix_backward(Tensor grad_y, Tensor a, Tensor mix, Tensor B, Tensor experts, float scaling) -> (Tensor, Tensor, Tensor, Tensor)"
)
def low_rank_mix_backward(
    grad_y: Tensor, a: Tensor, mix: Tensor, B: Tensor, experts: Tensor, scaling: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of a, mix, B and experts of ``low_rank_mix``'s output for ``grad_y`` (N, d)."""
    from .low_rank_mix import _torch_backward

    grads = native_low_rank.backward(grad_y, a, mix, B, experts, scaling)
    grad_a, grad_mix, grad_B, grad_experts = grads if grads is not None else _torch_backward(
        grad_y, a, mix, B, experts, scaling
    )
    return grad_a, grad_mix, grad_B.contiguous(), grad_experts  # B's comes transposed from the kernel


@torch.library.register_fake(OPS.low_rank_mix_backward.default)
def _(grad_y: Tensor, a: Tensor, mix: Tensor, B: Tensor, experts: Tensor, scaling: float) -> tuple[
    Tensor, Tensor, Tensor, Tensor
]:
    return a.new_empty(a.shape), mix.new_empty(mix.shape), B.new_empty(B.shape), experts.new_empty(experts.shape)


def _low_rank_mix_setup(ctx, inputs, output) -> None:
    _, a, mix, B, experts, scaling = inputs
    ctx.save_for_backward(a, mix, B, experts)
    ctx.scaling = scaling


def _low_rank_mix_grad(ctx, grad_y: Tensor):
    a, mix, B, experts = ctx.saved_tensors
    g = grad_y.reshape(-1, B.shape[0]).contiguous()
    grad_a, grad_mix, grad_B, grad_experts = OPS.low_rank_mix_backward.default(g, a, mix, B, experts, ctx.scaling)
    return grad_y, grad_a, grad_mix, grad_B, grad_experts, None


torch.library.register_autograd(OPS.low_rank_mix.default, _low_rank_mix_grad, setup_context=_low_rank_mix_setup)


# --- routing in training -------------------------------------------------------------------------------------------
def _unit_rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@_op(
    "route_train(Tensor h_rows, Tensor d_rows, Tensor? noise, float c_h, float c_d, float floor2, float threshold, float inv_t) -> (Tensor, Tensor, Tensor)"
)
def route_train(
    h_rows: Tensor, d_rows: Tensor, noise: Optional[Tensor], c_h: float, c_d: float, floor2: float, threshold: float,
    inv_t: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """probs, weights (N, E) and the logit scales (N, 2) of the default routing (native_train_route.forward_kernel)."""
    consts = (h_rows.shape[-1], c_h, c_d, floor2, threshold, inv_t)
    noise = None if noise is None else noise.contiguous()
    return native_train_route.forward_kernel(_unit_rows(h_rows), _unit_rows(d_rows), noise, consts)


@torch.library.register_fake(OPS.route_train.default)
def _(h_rows, d_rows, noise, c_h, c_d, floor2, threshold, inv_t) -> tuple[Tensor, Tensor, Tensor]:
    N, E = h_rows.shape
    return h_rows.new_empty(N, E), h_rows.new_empty(N, E), h_rows.new_empty(N, 2)


@_op(
    "route_train_backward(Tensor scales, Tensor? noise, Tensor probs, Tensor weights, Tensor grad_weights, Tensor? grad_probs, float threshold, float inv_t) -> (Tensor, Tensor)"
)
def route_train_backward(
    scales: Tensor, noise: Optional[Tensor], probs: Tensor, weights: Tensor, grad_weights: Tensor,
    grad_probs: Optional[Tensor], threshold: float, inv_t: float,
) -> tuple[Tensor, Tensor]:
    """The gradients (N, E) of the two routed slices of ``route_train`` (native_train_route.backward_kernel)."""
    noise = None if noise is None else noise.contiguous()
    return native_train_route.backward_kernel(scales, noise, probs, weights, grad_weights, grad_probs, threshold, inv_t)


@torch.library.register_fake(OPS.route_train_backward.default)
def _(scales, noise, probs, weights, grad_weights, grad_probs, threshold, inv_t) -> tuple[Tensor, Tensor]:
    return probs.new_empty(probs.shape), probs.new_empty(probs.shape)


def _route_train_setup(ctx, inputs, output) -> None:
    noise, threshold, inv_t = inputs[2], inputs[6], inputs[7]
    probs, weights, scales = output
    ctx.save_for_backward(scales, noise, probs, weights)
    ctx.threshold, ctx.inv_t = threshold, inv_t


def _route_train_grad(ctx, grad_probs: Optional[Tensor], grad_weights: Optional[Tensor], _grad_scales: Optional[Tensor]):
    scales, noise, probs, weights = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros_like(weights)
    grad_h, grad_d = OPS.route_train_backward.default(
        scales, noise, probs, weights, grad_weights, grad_probs, ctx.threshold, ctx.inv_t
    )
    return grad_h, grad_d, None, None, None, None, None, None


torch.library.register_autograd(OPS.route_train.default, _route_train_grad, setup_context=_route_train_setup)


# --- no-grad routing (evaluation, prefill, decoding) ---------------------------------------------------------------
@_op(
    "route_weights(Tensor h, Tensor delta_slice, int E, float c_h, float c_d, float floor2, float eps, int k, int auto, float threshold, int hard, float inv_t) -> Tensor"
)
def route_weights(
    h: Tensor, delta_slice: Tensor, E: int, c_h: float, c_d: float, floor2: float, eps: float, k: int, auto: int,
    threshold: float, hard: int, inv_t: float,
) -> Tensor:
    """The (N, E) mixing weights of a no-grad call (native_route.weights_kernel)."""
    plan = (E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t)
    mix = native_route.weights_kernel(h.contiguous(), delta_slice.contiguous(), plan)
    if mix is None:
        raise RuntimeError("peft_lime::route_weights: the kernel declined a call that tracing admitted")
    return mix


@torch.library.register_fake(OPS.route_weights.default)
def _(h, delta_slice, E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t) -> Tensor:
    return h.new_empty(delta_slice.numel() // E, E)


@_op(
    "route_modulate(Tensor h, Tensor out, Tensor delta, Tensor weight, Tensor? shared, Tensor? gate, int E, float c_h, float c_d, float floor2, float eps, int k, int auto, float threshold, int hard, float inv_t, float delta_scale=1.0) -> Tensor"
)
def route_modulate(
    h: Tensor, out: Tensor, delta: Tensor, weight: Tensor, shared: Optional[Tensor], gate: Optional[Tensor], E: int,
    c_h: float, c_d: float, floor2: float, eps: float, k: int, auto: int, threshold: float, hard: int, inv_t: float,
    delta_scale: float = 1.0,
) -> Tensor:
    """out + (delta * delta_scale) * modulation of a no-grad call, routing included (native_route.modulate_kernel)."""
    plan = (E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t)
    tensors = [None if t is None else t.contiguous() for t in (h, out, delta, weight, shared, gate)]
    y = native_route.modulate_kernel(*tensors, plan, delta_scale)
    if y is None:
        raise RuntimeError("peft_lime::route_modulate: the kernel declined a call that tracing admitted")
    return y


@torch.library.register_fake(OPS.route_modulate.default)
def _(h, out, delta, weight, shared, gate, E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t,
      delta_scale=1.0) -> Tensor:
    return out.new_empty(out.shape)


# --- routing statistics (training) ----------------------------------------------------------------------------------
@_op(
    "record_routing_stats(Tensor(a!) sums, Tensor probs, Tensor selected, Tensor? valid) -> ()"
)
def record_routing_stats(sums: Tensor, probs: Tensor, selected: Tensor, valid: Optional[Tensor]) -> None:
    """Add one call's statistics to ``sums``, a RoutingStats flat buffer (stats.sum_views). probs: (N, E); selected:
    (N, E) bool; valid: (N,) or None (every token counts)."""
    E = probs.shape[-1]
    native_stats.add(sums, sum_offsets(E), probs, selected, valid, [probs.numel() // E])


@torch.library.register_fake(OPS.record_routing_stats.default)
def _(sums: Tensor, probs: Tensor, selected: Tensor, valid: Optional[Tensor]) -> None:
    return None


# --- balance loss (training) ----------------------------------------------------------------------------------------
def _weights_of(w: Optional[Tensor]) -> Optional[Tensor]:
    return None if w is None else w.contiguous()


@_op(
    "balance_aux(Tensor probs, Tensor? w, float importance_coef, float kl_coef, float scale) -> Tensor"
)
def balance_aux(probs: Tensor, w: Optional[Tensor], importance_coef: float, kl_coef: float, scale: float) -> Tensor:
    """The scalar balance loss (c_imp * importance + c_kl * kl) * scale of probs (N, E), token weights w (N,) or None."""
    consts = (importance_coef, kl_coef, scale)
    return native_balance.forward_kernel(probs.contiguous(), _weights_of(w), consts)[0].clone()


@torch.library.register_fake(OPS.balance_aux.default)
def _(probs, w, importance_coef, kl_coef, scale) -> Tensor:
    return probs.new_empty(())


@_op(
    "balance_aux_backward(Tensor probs, Tensor? w, Tensor grad_aux, float importance_coef, float kl_coef, float scale) -> Tensor"
)
def balance_aux_backward(
    probs: Tensor, w: Optional[Tensor], grad_aux: Tensor, importance_coef: float, kl_coef: float, scale: float
) -> Tensor:
    """The gradient (N, E) of ``balance_aux``'s probs for ``grad_aux`` (a scalar tensor)."""
    consts = (importance_coef, kl_coef, scale)
    return native_balance.backward_kernel(probs.contiguous(), _weights_of(w), consts, float(grad_aux))


@torch.library.register_fake(OPS.balance_aux_backward.default)
def _(probs, w, grad_aux, importance_coef, kl_coef, scale) -> Tensor:
    return probs.new_empty(probs.shape)


def _balance_setup(ctx, inputs, output) -> None:
    probs, w, *consts = inputs
    ctx.save_for_backward(probs, w)
    ctx.consts = consts


def _balance_grad(ctx, grad_aux: Tensor):
    probs, w = ctx.saved_tensors
    return OPS.balance_aux_backward.default(probs, w, grad_aux, *ctx.consts), None, None, None, None


torch.library.register_autograd(OPS.balance_aux.default, _balance_grad, setup_context=_balance_setup)
