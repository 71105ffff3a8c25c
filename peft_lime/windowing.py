"""n-gram routing windows of one LiME layer call: training / prefill windows, and decoding that continues a cache."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Optional

import torch

from .decode_state import DecodeWindows
from .layout import TokenLayout
from .prefix_pooling import prefix_mean
from .routing import block_window_logits, causal_window_mean


def pools_over_sequence(n_gram: int, mode: str) -> bool:
    """Whether a token's route depends on other tokens of its sequence (so decoding needs kept state)."""
    return n_gram > 1 or mode == "prefix"


def window_logits(
    logits: torch.Tensor,
    n_gram: int,
    mode: str,
    layout: Optional[TokenLayout],
    windows: DecodeWindows,
    key: Hashable,
    keep: bool,
    track_opening: bool = False,
) -> torch.Tensor:
    """n-gram routing over (B, T, E) logits (or (N, E), one sequence); with ``keep``, keeps the decoding tail.

    ``layout`` None means the input is not laid out like the model's tokens (e.g. a vision tower): each row is one
    sequence, windows are computed within the call and nothing is kept for decoding. The layer keeps tails in eval
    mode only (decoding): a training step never continues a cache, and keeping nothing there leaves no per-step
    state behind (nothing for a compiled training step to re-check). ``track_opening``: prefix routing notes when every
    kept opening is complete (DecodeWindows.opening_complete: the centroid router then skips a decoded token's logits).
    """
    shape = logits.shape
    seq = logits if logits.dim() == 3 else logits.reshape(1, -1, shape[-1])
    valid = layout.valid if layout is not None else None
    if mode == "block":
        if layout is not None and layout.continuing:
            return logits  # a decoded token is the last known token of its block
        positions = layout.positions if layout is not None else None
        if positions is None:
            positions = torch.arange(seq.shape[1], device=seq.device).expand(seq.shape[0], -1)
        return block_window_logits(seq, n_gram, positions).reshape(shape)
    past = None
    if layout is not None and layout.continuing:
        past = windows.get(key, seq.shape[0], n_gram)
    if mode == "prefix":  # the mean of the sequence's first n tokens (prefix_pooling.py); state: their sum, count
        pooled, opening_sum, opening_count = prefix_mean(
            seq,
            n_gram,
            valid=valid,
            segments=layout.segments if layout is not None else None,
            past_sum=past[0] if past is not None else None,
            past_count=past[1] if past is not None else None,
        )
        if layout is not None and keep:
            state = (opening_sum.detach(), opening_count.detach())
            windows.put(key, state, continued=past is not None, n_gram=n_gram if track_opening else None)
        return pooled.reshape(shape)
    windowed = causal_window_mean(
        seq,
        n_gram,
        valid=valid,
        segments=layout.segments if layout is not None else None,
        past_logits=past[0] if past is not None else None,
        past_valid=past[1] if past is not None else None,
    )
    if layout is not None and keep:
        windows.keep(key, seq, valid, past, n_gram)
    return windowed.reshape(shape)
