"""Routing logits of the opening only: ``routing_mode="centroid"`` with ``ngram_mode="prefix"``.

With prefix routing a token's route is the mean logits of its sequence's first n valid tokens (prefix_pooling.py),
so the logits of every later token are never read. The centroid router's logits are the expensive kind (the whole
frozen output against E centroids: E x d_out multiply-adds per token, about half of a rank-8 LoRA on a square layer),
so they are computed for the opening tokens only:

- a call that starts its sequences (training, eval, prefill) without packed segments gathers the first n valid tokens
  of each row, computes their logits, and leaves every other token at 0 (n / T of the tokens; the pooled routes of
  the valid tokens are unchanged; a padding token, whose route nothing reads, gets the uniform mix);
- a decoding step whose cached openings are all complete computes nothing: the route is the kept opening mean.

Packed rows (several sequences per row, whose openings are data-dependent in number), a compiled call given position
ids, and a decoding step that still fills an opening compute every token's logits, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from .layout import TokenLayout


def opening_index(valid: Optional[torch.Tensor], batch: int, length: int, n: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) positions of each row's first n valid tokens and whether each exists (a row may hold fewer)."""
    if valid is None:
        index = torch.arange(n, device=device).expand(batch, n)
        return index, torch.ones(batch, n, dtype=torch.bool, device=device)
    counts = valid.long().cumsum(1).contiguous()
    wanted = torch.arange(1, n + 1, device=device).expand(batch, n).contiguous()
    index = torch.searchsorted(counts, wanted)  # the first position where the k-th valid token has been counted
    exists = index < length
    return index.clamp(max=length - 1), exists


def one_sequence_per_row(layout: TokenLayout) -> bool:
    """Whether each row's valid tokens form one sequence. Position ids make segments even when nothing is packed
    (generate passes them): their check is one host sync per forward call (kept on the layout, which every layer of
    the call shares); a compiled graph does not sync and takes every token's logits instead."""
    if layout.segments is None:
        return True
    known = layout.__dict__.get("_one_sequence_per_row")
    if known is None:
        if torch.compiler.is_compiling():
            return False
        seg = layout.segments
        valid = layout.valid if layout.valid is not None else torch.ones_like(seg, dtype=torch.bool)
        lowest = seg.masked_fill(~valid, torch.iinfo(seg.dtype).max).amin(1)
        highest = seg.masked_fill(~valid, torch.iinfo(seg.dtype).min).amax(1)
        known = bool(((highest <= lowest) | ~valid.any(1)).all())
        layout.__dict__["_one_sequence_per_row"] = known
    return known


def opening_only_logits(
    h: torch.Tensor,
    n: int,
    layout: Optional[TokenLayout],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    num_experts: int,
    opening_complete: bool,
) -> Optional[torch.Tensor]:
    """(B, T, E) logits with only the ones prefix routing reads computed, or None when every token's are needed.

    ``h``: (B, T, d) or (B * T, d) frozen output laid out like ``layout``; ``logits_of``: (..., d) -> (..., E);
    ``opening_complete``: a decoding step whose kept openings all hold n tokens already (DecodeWindows).
    """
    if layout is None or layout.batch_size < 1:
        return None
    B, T = layout.batch_size, layout.new_tokens
    if layout.continuing:
        if not opening_complete:
            return None
        return h.new_zeros(B, T, num_experts, dtype=torch.float32)  # read by nothing: the kept mean routes
    if T <= n or not one_sequence_per_row(layout):
        return None  # every token is in its opening, or packed rows
    seq = h.reshape(B, T, h.shape[-1])
    index, exists = opening_index(layout.valid, B, T, n, h.device)
    picked = seq.gather(1, index.unsqueeze(-1).expand(B, n, seq.shape[-1]))
    values = logits_of(picked) * exists.unsqueeze(-1)
    out = torch.zeros(B, T, num_experts, dtype=values.dtype, device=h.device)
    # scatter_add: a missing token's clamped position may repeat a real one, and adds 0 there.
    return out.scatter_add(1, index.unsqueeze(-1).expand(B, n, num_experts), values)
