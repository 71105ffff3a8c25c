"""TokenLayout: how the tokens of one layer input are laid out (padding, packed sequences, cached continuation), and
CallScope: the layouts of one model call in progress (context.py keeps a stack of them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class TokenLayout:
    """Token layout of one layer input of shape (B, T, ...): validity, packed-sequence ids, in-sequence positions."""

    valid: Optional[torch.Tensor]  # (B, T) bool, False for padding
    segments: Optional[torch.Tensor]  # (B, T) sequence id inside a packed row
    positions: Optional[torch.Tensor]  # (B, T) position inside its own sequence
    continuing: bool  # True when these tokens extend a cached sequence (decoding with KV cache)
    batch_size: int = -1  # B
    new_tokens: int = -1  # T


@dataclass
class CallScope:
    """The token layouts of one (sub)model call in progress: its own tokens (None when the call has none, e.g. a
    vision tower given pixels) and, for a decoder, the encoder states its cross-attention projections read."""

    owner: Any  # the module whose call this is (leave() pops only its own scope)
    layout: Optional[TokenLayout]
    encoder_states: Optional[torch.Tensor] = None
    encoder_layout: Optional[TokenLayout] = None
    # KV caches this call puts tokens into (followed for n-gram windows): marked filled when the forward returns.
    caches: list[Any] = field(default_factory=list)

    def layout_of(self, x: torch.Tensor) -> Optional[TokenLayout]:
        """The layout of a layer input of this call, or None when it is not laid out like the call's tokens."""
        if self.encoder_states is not None and x is self.encoder_states:
            return self.encoder_layout  # cross-attention k / v: encoder tokens, never decoder ones
        layout = self.layout
        if layout is None:
            return None
        # Laid out (B, T, ...) like the call's tokens, or as their B * T rows in (batch, time) order (OPT flattens
        # them before its MLP). Inline checks: decoding runs this once per layer and token.
        if x.dim() >= 3:
            if x.shape[0] == layout.batch_size and x.shape[1] == layout.new_tokens:
                return layout
        elif x.dim() == 2 and x.shape[0] == layout.batch_size * layout.new_tokens:
            return layout
        return None


def as_sequences(rows: torch.Tensor, layout: Optional[TokenLayout]) -> torch.Tensor:
    """(N, k) rows of a layer input as (sequences, tokens, k) for routing windows.

    Rows of the call's tokens (a model that flattens batch and time, e.g. OPT's MLP) get the call's (B, T) layout;
    rows laid out like no call's tokens (a pooled head's (B, d), a layer run on its own) are one token each, so no
    window runs across samples.
    """
    if layout is not None:
        return rows.reshape(layout.batch_size, layout.new_tokens, rows.shape[-1])
    return rows.unsqueeze(1)
