"""Per-forward routing context: what the LiME layers need to know about the batch that the layers cannot see.

A forward pre-hook on the wrapped model (the transformers model, so it also fires inside ``generate``) reads the
attention mask, position ids and cache state of each call; the layers then look up, for their own input, which
tokens are padding, where packed sequences start and whether this call continues a cached sequence. Layers whose
input is not laid out like the model's tokens (a vision tower, a pooled head) see no mask: each of their rows is one
sequence and every token counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .decode_state import DecodeWindows
from .layout import TokenLayout
from .routing import segment_ids_from_positions

# Names under which transformers hands the KV cache to a model's forward: ``cache`` since 5.24 (``past_key_values``
# is then a deprecated alias), ``past_key_values`` before.
CACHE_KWARGS = ("cache", "past_key_values")


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
    # Cached decoding with n-gram windows (decode_state.py); the cache is followed only when some adapter of the
    # model has n_gram > 1 (LimeModel keeps this flag up to date).
    windows: DecodeWindows = field(default_factory=DecodeWindows)
    track_windows: bool = False
    # When routing statistics are recorded (see telemetry.set_routing_stats_mode): "training" (default: training-mode
    # forwards only, so inference and decoding pay nothing), "always" or "off".
    stats_mode: str = "training"
    # Called as capture(layer, adapter, weights, layout) with every call's (N, E) mixing weights, while
    # static_routing.collect_routing_profiles runs; None otherwise (no cost).
    weights_capture: Optional[Callable[..., None]] = None

    def records_stats(self, training: bool) -> bool:
        return self.stats_mode == "always" or (training and self.stats_mode == "training")

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
        mask = kwargs.get("attention_mask")
        valid = None
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= T:
            valid = mask[:, -T:].bool()
        self.batch_size, self.new_tokens = B, T
        if not self.track_windows:
            # Without n-gram windows only padding matters: the cache length is not read at all (a static cache
            # keeps it in a tensor, and reading it would stop a compiled decoding step).
            self.layout = TokenLayout(valid=valid, segments=None, positions=None, continuing=False)
            return
        cache = cache_from_kwargs(kwargs)
        continuing = past_length(kwargs, cache) > 0
        if not continuing:
            self.windows.start()
        self.windows.follow(cache)
        position_ids = kwargs.get("position_ids")
        segments = positions = None
        if torch.is_tensor(position_ids) and position_ids.dim() == 2 and position_ids.shape[-1] == T:
            position_ids = position_ids.expand(B, T)
            positions = position_ids
            if not continuing:
                segments = segment_ids_from_positions(position_ids)
        elif valid is not None and not continuing:
            positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        self.layout = TokenLayout(valid=valid, segments=segments, positions=positions, continuing=continuing)

    def layout_for(self, x: torch.Tensor) -> Optional[TokenLayout]:
        """The layout of a layer input, or None when it is not laid out like the model's tokens."""
        if self.layout is None or x.dim() < 3:
            return None
        if x.shape[0] != self.batch_size or x.shape[1] != self.new_tokens:
            return None
        return self.layout


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The KV cache object of a forward call, whichever name transformers used for it."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def past_length(kwargs: dict[str, Any], cache: Any) -> int:
    """Number of tokens already in the cache before this call (0: a new sequence starts)."""
    cache_position = kwargs.get("cache_position")
    if torch.is_tensor(cache_position) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    if cache is None:
        return 0
    get_len = getattr(cache, "get_seq_length", None)
    if get_len is not None:
        return int(get_len())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    return 0
