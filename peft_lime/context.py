"""Per-call routing context: what the LiME layers need to know about the tokens that the layers cannot see.

Hooks on the wrapped model and on each of its sub-models (every ``PreTrainedModel`` inside it: an encoder, a decoder,
a vision tower, a language model) read the attention mask, position ids and cache state of each call; the layers
then look up, for their own input, which tokens are padding, where packed sequences start and whether this call
continues a cached sequence. The context is scoped to the call that owns the tokens: a stack of CallScope, pushed when
a (sub)model call starts and popped when it returns (or raises). So the encoder's layers see the encoder's tokens, the
decoder's layers the decoder's (decoder_input_ids, their mask and cache), a vision tower the tower's own call (no
token layout: each row is one sequence), and a layer run outside any call (generate calling a vision tower itself)
sees no layout at all, never a decoding step that has finished. Layers whose input is not laid out like the call's
tokens (a pooled head, cross-attention on encoder states) see no mask: each of their rows is one sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .decode_state import (
    DecodeWindows,
    cache_length,
    count_cached_tokens,
    is_filled,
    mark_filled,
    record_created_cache,
)
from .layout import CallScope, TokenLayout
from .routing import segment_ids_from_positions

# Names under which transformers hands the KV cache to a model's forward: ``cache`` since 5.24 (``past_key_values``
# is then a deprecated alias), ``past_key_values`` before. Model outputs return it under the same names.
CACHE_KWARGS = ("cache", "past_key_values")


@dataclass
class RoutingContext:
    """Shared by LimeModel and all its LiME layers (plain object: no tensors saved, nothing to shard)."""

    # The calls in progress, innermost last (see track_model_calls).
    scopes: list[CallScope] = field(default_factory=list)
    # The layout each layer saw in its last eager training forward: gradient checkpointing recomputes the layer in
    # backward, when no call is in progress, and it must route exactly as it did (id(layer) -> layout).
    recompute_layouts: dict[int, Optional[TokenLayout]] = field(default_factory=dict)
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

    # --- call scopes --------------------------------------------------------------------------------------------
    def enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], encoder_decoder: bool = False) -> None:
        """A (sub)model call starts: push the layouts of its tokens (called by its forward pre-hook)."""
        outer = self.scopes[-1] if self.scopes else None
        scope = CallScope(module, None)
        # The outermost scope stands for the whole forward: the (sub)model calls of one forward count the tokens of a
        # length-less cache once (decode_state.py). An object, not a counter: compiled code would guard on an int.
        call = self.scopes[0] if outer is not None else scope
        scope.layout = self._call_layout(args, kwargs, outer, encoder_decoder, call)
        states = kwargs.get("encoder_hidden_states")
        if torch.is_tensor(states) and states.dim() == 3:
            # Cross-attention projections of a decoder read these: encoder tokens, with the encoder's padding.
            B, S = states.shape[0], states.shape[1]
            scope.encoder_states = states
            scope.encoder_layout = _layout(
                _valid(kwargs.get("encoder_attention_mask"), B, S), False, B, S, self.track_windows
            )
        self.scopes.append(scope)

    def leave(self, module: nn.Module, output: Any) -> None:
        """The call of ``module`` returned or raised: pop its scope (called by its always-called forward hook)."""
        if not self.scopes or self.scopes[-1].owner is not module:
            return  # its pre-hook failed before pushing
        scope = self.scopes.pop()
        if self.track_windows and scope.layout is not None and isinstance(output, dict):
            # A cache the model created itself (none was passed in): count this call's tokens into it, for caches
            # that do not count them (recurrent / linear attention; decode_state.py).
            call = self.scopes[0] if self.scopes else scope
            record_created_cache(cache_from_kwargs(output), scope.layout.new_tokens, call)
            if not self.scopes:
                scope.caches.append(cache_from_kwargs(output))
        if not self.scopes:  # the whole forward has returned: its caches now hold tokens
            for cache in scope.caches:
                mark_filled(cache)

    def layout_for(self, x: torch.Tensor, layer: nn.Module) -> Optional[TokenLayout]:
        """The layout of a layer input, or None when it is not laid out like the tokens of the call it runs in."""
        if self.scopes:
            layout = self.scopes[-1].layout_of(x)
            if layer.training and not torch.compiler.is_compiling():
                self.recompute_layouts[id(layer)] = layout
            return layout
        # No call in progress: gradient checkpointing recomputing the layer in backward (eager), or a layer run on
        # its own (a vision tower called by generate): that one sees no layout and never continues a sequence.
        if layer.training and not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return self.recompute_layouts.get(id(layer))
        return None

    def _call_layout(
        self, args: tuple, kwargs: dict[str, Any], outer: Optional[CallScope], encoder_decoder: bool, call: CallScope
    ) -> Optional[TokenLayout]:
        """The layout of a call's own tokens: the decoder's when it is given decoder tokens, else its input's."""
        ref = kwargs.get("decoder_input_ids")
        if ref is None:
            ref = kwargs.get("decoder_inputs_embeds")
        if ref is not None:
            mask, position_ids = kwargs.get("decoder_attention_mask"), kwargs.get("decoder_position_ids")
        elif encoder_decoder:
            return None  # an encoder-decoder called without decoder tokens: input_ids are the encoder's tokens
        else:
            ref = kwargs.get("input_ids")
            if ref is None and args and torch.is_tensor(args[0]):
                ref = args[0]
            if ref is None:
                ref = kwargs.get("inputs_embeds")
            mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if ref is None or ref.dim() < 2:
            return None
        B, T = ref.shape[0], ref.shape[1]
        valid = _valid(mask, B, T)
        if valid is None and mask is not None and outer is not None and outer.layout is not None:
            if outer.layout.batch_size == B and outer.layout.new_tokens == T:
                # A mask this call cannot read (4-D, or one per attention type): the enclosing call's, same tokens.
                return outer.layout
        if not self.track_windows:
            # Without n-gram windows only padding matters: the cache length is not read at all (a static cache
            # keeps it in a tensor, and reading it would stop a compiled decoding step).
            return TokenLayout(valid, None, None, False, B, T)
        cache = cache_from_kwargs(kwargs)
        # Compiled: the host-side flag (decode_state.is_filled), not cache_position's value, which would stop the graph.
        filled = is_filled(cache) if cache is not None and torch.compiler.is_compiling() else None
        continuing = filled if filled is not None else past_length(kwargs.get("cache_position"), cache, T, call) > 0
        if cache is not None:
            if not continuing:
                self.windows.start()  # a new sequence starts in this cache
            self.windows.follow(cache)
            call.caches.append(cache)
        if torch.is_tensor(position_ids) and position_ids.dim() == 2 and position_ids.shape[-1] == T:
            position_ids = position_ids.expand(B, T)
            segments = None if continuing else segment_ids_from_positions(position_ids)
            return TokenLayout(valid, segments, position_ids, continuing, B, T)
        return _layout(valid, continuing, B, T, True)


def _valid(mask: Any, B: int, T: int) -> Optional[torch.Tensor]:
    """(B, T) bool validity of the last T tokens of a 2-D attention mask; None when there is no such mask."""
    if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= T:
        return mask[:, -T:].bool()
    return None


def _layout(valid: Optional[torch.Tensor], continuing: bool, B: int, T: int, windows: bool) -> TokenLayout:
    # In-sequence positions from the mask, for block windows of a padded batch (a decoded token needs none).
    positions = None
    if windows and valid is not None and not continuing:
        positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    return TokenLayout(valid, None, positions, continuing, B, T)


def track_model_calls(model: nn.Module, context: RoutingContext) -> list[torch.utils.hooks.RemovableHandle]:
    """Scope ``context`` to every call of ``model`` and of its sub-models (hooks; returns their handles)."""
    from transformers import PreTrainedModel

    handles = []
    subs = [m for m in model.modules() if m is not model and isinstance(m, PreTrainedModel)]
    for module in [model, *subs]:
        hooks = CallHooks(context, _is_encoder_decoder(module), top=module is model)
        handles.append(module.register_forward_pre_hook(hooks.enter, with_kwargs=True))
        handles.append(module.register_forward_hook(hooks.leave, always_call=True))
    return handles


class CallHooks:
    """The forward hooks of one tracked (sub)model; bound methods of a plain object, so that a deepcopy or pickle of
    the model keeps them, bound to the copy's context. The outermost model's pre-hook also takes ``task_ids``
    (routing telemetry only) out of the call's kwargs."""

    def __init__(self, context: RoutingContext, encoder_decoder: bool, top: bool) -> None:
        self.context, self.encoder_decoder, self.top = context, encoder_decoder, top

    def enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple[tuple, dict]]:
        context = self.context
        if self.top:
            kwargs = dict(kwargs)
            task_ids = kwargs.pop("task_ids", None)  # never reaches the base model
            # Task ids belong to this call only: a later call without them must not inherit them.
            pending, context.pending_task_ids = context.pending_task_ids, None
            context.task_ids = task_ids if torch.is_tensor(task_ids) else pending
        context.enter(module, args, kwargs, self.encoder_decoder)
        return (args, kwargs) if self.top else None

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.context.leave(module, output)


def _is_encoder_decoder(module: nn.Module) -> bool:
    """An encoder-decoder model (not its encoder or decoder): its own tokens are the decoder's."""
    config = getattr(module, "config", None)
    get_encoder = getattr(module, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or get_encoder is None:
        return False
    return get_encoder() is not module


def cache_from_kwargs(kwargs: Any) -> Any:
    """The KV cache object of a forward call (or of a model output), whichever name transformers used for it."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def past_length(cache_position: Any, cache: Any, new_tokens: int, call: object) -> int:
    """Number of tokens already in the cache before this call (0: a new sequence starts).

    ``cache_position`` when given, else the cache's own length, else (recurrent / linear-attention caches, which
    keep no length) the tokens LiME's calls counted into that cache object.
    """
    if torch.is_tensor(cache_position) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):  # legacy tuple cache
        return int(cache[0][0].shape[-2]) if cache and cache[0] is not None else 0
    length = cache_length(cache)
    return length if length is not None else count_cached_tokens(cache, new_tokens, call)
