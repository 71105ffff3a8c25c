"""LiME's routing statistics added to their sums by one native CPU call (csrc/lime_stats.c).

RoutingStats (stats.py) keeps on-device sums (tokens, entropy, loads, per-call balance terms, the Auto Top-K
histogram). Written as tensor ops, adding one fold of recorded calls to them is about forty small ops; inside a
compiled training step it is about sixty ops per wrapped layer, for which inductor generated and compiled C++ code:
most of LiME's compile time over plain LoRA's (a 2-layer model compiled its first train step in 54 s with the
statistics on, 38 s with them off, LoRA's in 31 s). The kernel does the same sums in one pass over the (N, E)
probabilities; a compiled model calls it through the custom op ``peft_lime::record_routing_stats`` (native_ops.py),
one opaque node per layer.

Covered: float32 plain CPU probabilities, E <= 64, no per-token task ids (the task table stays with the tensor ops),
the native switch on (``PEFT_LIME_NATIVE`` / ``native_route.set_native``), the library loaded. Elsewhere stats.py's
tensor ops run; they are the reference the tests compare this with (every sum at 1e-5).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from . import native_route

# The sums the kernel writes, in its argument order (stats.SUM_SHAPES names).
KERNEL_SUMS = (
    "tokens", "calls", "entropy", "active", "probs", "load", "importance", "kl", "active_hist", "nonfinite",
)


def applies(probs: torch.Tensor, traced: bool = False) -> bool:
    """Whether the kernel adds the statistics of ``probs`` (N, E): switch on, float32 plain CPU, E <= 64, and the
    library loaded (``traced``: decided while dynamo traces a compiled model, native_route.traced_native)."""
    if probs.shape[-1] > native_route.MAX_EXPERTS:
        return False
    if traced:
        return native_route.traced_native(probs)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # a ctypes call cannot be traced
        return False
    return native_route._enabled and native_route.plain_float_cpu(probs) and native_route.available()


def add(
    flat: torch.Tensor, offsets: dict[str, int], probs: torch.Tensor, selected: torch.Tensor,
    weights: Optional[torch.Tensor], call_lengths: list[int],
) -> None:
    """Add the statistics of recorded calls to the sums of ``flat``, a float32 CPU buffer whose sums start at
    ``offsets`` (stats.sum_offsets). probs: (N, E) float32; selected: (N, E) bool; weights: (N,) token weights
    (None: every token counts 1); the N rows are the calls' tokens in order, ``call_lengths`` tokens each."""
    E = probs.shape[-1]
    probs = probs.reshape(-1, E).contiguous()
    chosen = selected.reshape(-1, E)
    chosen = (chosen if chosen.dtype == torch.bool else chosen.to(torch.bool)).contiguous()
    w = None if weights is None else weights.reshape(-1)
    if w is not None:
        w = (w if w.dtype == torch.float32 else w.to(torch.float32)).contiguous()
    lengths = (ctypes.c_long * len(call_lengths))(*call_lengths)
    base = flat.data_ptr()
    out = [base + 4 * offsets[name] for name in KERNEL_SUMS]  # float32: 4 bytes an element
    native_route.stats_kernel(
        probs.data_ptr(), chosen.data_ptr(), None if w is None else w.data_ptr(), lengths, len(call_lengths), E, *out,
    )
