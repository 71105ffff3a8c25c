"""TokenLayout: how the tokens of one layer input are laid out (padding, packed sequences, cached continuation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TokenLayout:
    """Token layout of one layer input of shape (B, T, ...): validity, packed-sequence ids, in-sequence positions."""

    valid: Optional[torch.Tensor]  # (B, T) bool, False for padding
    segments: Optional[torch.Tensor]  # (B, T) sequence id inside a packed row
    positions: Optional[torch.Tensor]  # (B, T) position inside its own sequence
    continuing: bool  # True when these tokens extend a cached sequence (decoding with KV cache)
