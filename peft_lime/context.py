"""Per-forward routing context: what the LiME layers need to know about the batch that the layers cannot see.

A forward pre-hook on the wrapped model (the transformers model, so it also fires inside ``generate``) reads the
attention mask, position ids and cache state of each call; the layers then look up, for their own input, which
tokens are padding, where packed sequences start and whether this call continues a cached sequence. Layers whose
input is not laid out like the model's tokens (a vision tower, a pooled head) see no mask: each of their rows is one
sequence and every token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .routing import segment_ids_from_positions


@dataclass
class TokenLayout:
    """Token layout of one layer input of shape (B, T, ...): validity, packed-sequence ids, in-sequence positions."""

    valid: Optional[torch.Tensor]  # (B, T) bool, False for padding
    segments: Optional[torch.Tensor]  # (B, T) sequence id inside a packed row
    positions: Optional[torch.Tensor]  # (B, T) position inside its own sequence
    continuing: bool  # True when these tokens extend a cached sequence (decoding with KV cache)


@dataclass
class RoutingContext:
    """Shared by LimeModel and all its LiME layers (plain object: no tensors saved, nothing to shard)."""

    batch_size: int = -1
    new_tokens: int = -1
    layout: Optional[TokenLayout] = None
    task_ids: Optional[torch.Tensor] = None
    # Task ids read off the PeftModel's call (see enable_task_ids), consumed by the next call of the wrapped model.
    pending_task_ids: Optional[torch.Tensor] = None
    # 1 / gradient-accumulation steps, so the injected aux gradient is scaled like the LM loss.
    aux_loss_scale: float = 1.0
    # Number of LiME layers per adapter: the aux loss is a mean over layers.
    layers_per_adapter: dict[str, int] = field(default_factory=dict)
    # Cached decoding with n-gram windows: the last n-1 routing logits (and validity) of every sequence, per LiME
    # layer and adapter. They belong to the sequences in the KV cache, so they follow it (see follow_cache).
    decode_tails: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Why the tails no longer match the cache (e.g. it was cropped), for the error of the next decoding step.
    decode_tails_lost: Optional[str] = None

    def clear(self) -> None:
        self.batch_size, self.new_tokens, self.layout, self.task_ids = -1, -1, None, None

    def update_from_call(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Read what routing needs from the model's forward arguments (called by the pre-hook)."""
        ref = kwargs.get("input_ids")
        if ref is None and args and torch.is_tensor(args[0]):
            ref = args[0]
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None or ref.dim() < 2:
            self.clear()
            return
        B, T = ref.shape[0], ref.shape[1]
        continuing = _past_length(kwargs) > 0
        if not continuing:  # a new sequence starts: earlier decoding windows no longer apply
            self.decode_tails.clear()
            self.decode_tails_lost = None
        self.follow_cache(kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        valid = None
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= T:
            valid = mask[:, -T:].bool()
        position_ids = kwargs.get("position_ids")
        segments = positions = None
        if torch.is_tensor(position_ids) and position_ids.dim() == 2 and position_ids.shape[-1] == T:
            position_ids = position_ids.expand(B, T)
            positions = position_ids
            if not continuing:
                segments = segment_ids_from_positions(position_ids)
        elif valid is not None and not continuing:
            positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        self.batch_size, self.new_tokens = B, T
        self.layout = TokenLayout(valid=valid, segments=segments, positions=positions, continuing=continuing)

    def follow_cache(self, cache: Any) -> None:
        """Make the kept routing windows follow what ``generate`` does to the KV cache object.

        Beam search reorders the cache rows, contrastive search and ``num_return_sequences`` select or repeat them:
        the windows are reordered the same way. Assisted decoding crops the cache, which would need logits that were
        never kept: the windows are marked lost and the next decoding step raises a clear error instead of routing
        with the wrong tokens. The cache object's methods are wrapped on the instance, once.
        """
        if cache is None or not hasattr(cache, "reorder_cache") or cache.__dict__.get("_lime_context") is self:
            return
        cache.__dict__["_lime_context"] = self

        def follow(method_name: str, update) -> None:
            original = getattr(cache, method_name, None)
            if original is None:
                return

            def wrapped(arg):
                result = original(arg)
                update(arg)
                return result

            setattr(cache, method_name, wrapped)

        def select(indices: torch.Tensor) -> None:
            for key, (logits, valid) in self.decode_tails.items():
                idx = indices.to(logits.device)
                self.decode_tails[key] = (logits.index_select(0, idx), valid.index_select(0, idx))

        def repeat(repeats: int) -> None:
            for key, (logits, valid) in self.decode_tails.items():
                self.decode_tails[key] = (logits.repeat_interleave(repeats, 0), valid.repeat_interleave(repeats, 0))

        def lose(_: Any) -> None:
            if self.decode_tails:
                self.decode_tails.clear()
                self.decode_tails_lost = "the KV cache was cropped (assisted or speculative decoding)"

        follow("reorder_cache", select)
        follow("batch_select_indices", select)
        follow("batch_repeat_interleave", repeat)
        follow("crop", lose)

    def layout_for(self, x: torch.Tensor) -> Optional[TokenLayout]:
        """The layout of a layer input, or None when it is not laid out like the model's tokens."""
        if self.layout is None or x.dim() < 3:
            return None
        if x.shape[0] != self.batch_size or x.shape[1] != self.new_tokens:
            return None
        return self.layout


def _past_length(kwargs: dict[str, Any]) -> int:
    cache_position = kwargs.get("cache_position")
    if torch.is_tensor(cache_position) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    past = kwargs.get("past_key_values")
    if past is None:
        return 0
    get_len = getattr(past, "get_seq_length", None)
    if get_len is not None:
        return int(get_len())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:  # legacy tuple cache
        return int(past[0][0].shape[-2])
    return 0
