"""Decode-time routing state: the n-gram routing windows of the sequences held in a KV cache.

With ``n_gram > 1`` a decoded token routes with the mean logits of itself and the n - 1 tokens before it, which were
computed by earlier forward calls. ``DecodeWindows`` keeps those last n - 1 logits per LiME layer and adapter, and
makes them follow the KV cache object: generate reorders the cache (beam search), selects or repeats its rows
(contrastive search, ``num_return_sequences``) or crops it (assisted decoding). Reorders are applied to the windows
too; a crop that removes tokens loses them (the logits of the tokens before the kept tail were never stored), and the
next decoding step then refuses to guess (see ``get``). With ``ngram_mode="prefix"`` the kept pair is the opening's
logit sum and token count instead (prefix_pooling.py); it follows the cache the same way.

It is the only writer of this state: the layers call ``get`` / ``keep``, the routing context calls ``start`` and
``follow``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Optional

import torch

# Generate options that verify several proposed tokens per step and roll the cache back: the windows of the
# rolled-back tokens cannot be rebuilt from the kept tails, so these are refused when an adapter has n_gram > 1.
CANDIDATE_DECODING_KWARGS = (
    "assistant_model",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "assistant_tokenizer",
)

ASSISTED_DECODING_ERROR = (
    "n_gram={n_gram}: {option} decodes with candidate tokens and rolls the KV cache back, and LiME's routing windows "
    "of the rolled-back tokens cannot be rebuilt. Assisted / prompt-lookup / speculative decoding is not supported "
    "with n_gram > 1 or ngram_mode='prefix'; greedy, sampling and beam search are (or use n_gram=1 with ngram_mode 'causal')."
)


class DecodeWindows:
    """The last n - 1 routing logits (and their validity) of every cached sequence, per (layer, adapter) key."""

    def __init__(self) -> None:
        self._tails: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        # Prefix routing: keys whose kept openings all hold n tokens (known on the host; opening_logits.py).
        self._complete: set[Hashable] = set()
        # Why the kept windows no longer match the cache (e.g. it was cropped), for the error of the next step.
        self.lost_reason: Optional[str] = None

    def __len__(self) -> int:
        return len(self._tails)

    def start(self) -> None:
        """A new sequence starts (a forward without cached tokens): earlier windows no longer apply."""
        self._tails.clear()
        self._complete.clear()
        self.lost_reason = None

    def get(self, key: Hashable, batch_size: int, n_gram: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tail of ``key`` for a decoding step over ``batch_size`` rows; clear error when unknown."""
        tail = self._tails.get(key)
        if tail is None or tail[0].shape[0] != batch_size:
            why = self.lost_reason or "the cache was built elsewhere or changed outside generate"
            raise RuntimeError(
                f"n_gram={n_gram}: this decoding step continues sequences whose earlier routing windows are unknown "
                f"({why}). Assisted / speculative decoding is not supported with n_gram > 1; greedy, sampling and "
                "beam search are."
            )
        return tail

    def keep(
        self,
        key: Hashable,
        logits: torch.Tensor,
        valid: Optional[torch.Tensor],
        past: Optional[tuple[torch.Tensor, torch.Tensor]],
        n_gram: int,
    ) -> None:
        """Store the last n - 1 logits of (past tail + this call's tokens). logits: (B, T, E); valid: (B, T)."""
        B, T, _ = logits.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=logits.device)
        if past is not None:
            logits = torch.cat([past[0].to(logits.dtype), logits], dim=1)
            valid = torch.cat([past[1], valid], dim=1)
        keep = n_gram - 1
        # Contiguous: a compiled decoding step guards on the strides of the tail it reads, and a slice of the
        # prompt's logits has other strides than a slice of one step's.
        self._tails[key] = (logits[:, -keep:].detach().contiguous(), valid[:, -keep:].contiguous())

    def put(
        self, key: Hashable, state: tuple[torch.Tensor, torch.Tensor], continued: bool, n_gram: Optional[int] = None
    ) -> None:
        """Store a row-aligned state pair of ``key`` as it is (prefix routing: the opening's logit sum and count).
        With ``n_gram`` (eager only: one host sync per call until it holds), note whether every opening is complete."""
        self._tails[key] = (state[0].contiguous(), state[1].contiguous())  # contiguous: see keep
        if not continued:
            self._complete.discard(key)  # new sequences
        if n_gram is not None and key not in self._complete and not torch.compiler.is_compiling():
            if bool((state[1] >= n_gram).all()):
                self._complete.add(key)

    def opening_complete(self, key: Hashable) -> bool:
        """Whether every kept opening of ``key`` holds n tokens: a decoded token then does not change its route.
        Row reorders and repeats keep this true; only new sequences (start, put without ``continued``) end it."""
        return key in self._complete

    def forget(self, key_filter: Callable[[Hashable], bool]) -> None:
        """Drop the windows whose key matches (an adapter was re-created or deleted)."""
        for key in [k for k in self._tails if key_filter(k)]:
            del self._tails[key]
            self._complete.discard(key)

    def reorder(self, indices: torch.Tensor) -> None:
        """Rows of the cache were selected / reordered (beam search, contrastive search)."""
        for key, (logits, valid) in self._tails.items():
            idx = indices.to(logits.device)
            self._tails[key] = (logits.index_select(0, idx), valid.index_select(0, idx))

    def repeat(self, repeats: int) -> None:
        """Rows of the cache were repeated (``num_return_sequences``, beam expansion)."""
        for key, (logits, valid) in self._tails.items():
            self._tails[key] = (logits.repeat_interleave(repeats, 0), valid.repeat_interleave(repeats, 0))

    def lose(self, reason: str) -> None:
        """The cache changed in a way the windows cannot follow; the next decoding step will raise."""
        if self._tails:
            self._tails.clear()
            self._complete.clear()
            self.lost_reason = reason

    def follow(self, cache: Any) -> None:
        """Wrap the cache object's row operations (on the instance, once) so that the windows follow them.

        A crop is detected by the cache length (before vs after), which works whatever the crop argument means in
        the installed transformers (absolute length in older versions, tokens to remove in 5.24+; ``crop(0)`` of
        5.24's decoding loop removes nothing and keeps the windows). Row operations need no length, so caches that
        keep none (recurrent / linear attention) are followed too; a reset empties the cache: its count restarts.
        """
        if not hasattr(cache, "__dict__") or cache.__dict__.get("_lime_windows") is self:
            return
        cache.__dict__["_lime_windows"] = self

        def wrap(method_name: str, after: Callable[[Any], None], measure: bool = False) -> None:
            original = getattr(cache, method_name, None)
            if original is None:
                return

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                before = cache_length(cache) if measure else None
                result = original(*args, **kwargs)
                if measure:
                    now = cache_length(cache)
                    if before is not None and now is not None and now < before:
                        self.lose("the KV cache was cropped (assisted or speculative decoding)")
                else:
                    after(args[0] if args else next(iter(kwargs.values()), None))
                return result

            setattr(cache, method_name, wrapped)

        wrap("reorder_cache", self.reorder)
        wrap("batch_select_indices", self.reorder)
        wrap("batch_repeat_interleave", self.repeat)
        wrap("crop", lambda _: None, measure=True)
        wrap("reset", lambda _: forget_tokens(cache))


# A cache object's count of the tokens LiME's calls put into it, for caches that keep no length: (call, tokens before
# that call, tokens after it), the call being its outermost scope object. Every (sub)model call of one forward reads
# the same "before".
_TOKEN_COUNT = "_lime_token_count"


# Set on a cache object when a forward of LiME's model has put tokens into it, cleared by its reset(): whether a call
# continues a sequence, known on the host. A compiled decoding step reads this flag instead of cache_position's first
# element: reading a tensor's value stops the graph (and a host-side length would be a guard that changes every
# step), while a bool is a guard with two values, prefill and decode.
_FILLED = "_lime_filled"


def mark_filled(cache: Any) -> None:
    """A forward of LiME's model has put tokens into ``cache``."""
    if cache is not None and hasattr(cache, "__dict__"):
        setattr(cache, _FILLED, True)


def is_filled(cache: Any) -> Optional[bool]:
    """True when LiME's model has put tokens into ``cache`` since it was created or reset; None when unknown."""
    return getattr(cache, _FILLED, None)


def forget_tokens(cache: Any) -> None:
    """The cache was reset: it holds no tokens, and its counts restart."""
    cache.__dict__.pop(_TOKEN_COUNT, None)
    cache.__dict__.pop(_FILLED, None)


def cache_length(cache: Any) -> Optional[int]:
    """Tokens held by a cache, or None when it keeps no length (only recurrent / linear-attention layers)."""
    get_len = getattr(cache, "get_seq_length", None)
    if get_len is None or cache.__dict__.get("_lime_no_length"):
        return None
    try:
        return int(get_len())
    except (ValueError, NotImplementedError):  # transformers: "can only be called on Attention layers"
        cache.__dict__["_lime_no_length"] = True
        return None


def count_cached_tokens(cache: Any, new_tokens: int, call: object) -> int:
    """Tokens before this call in a cache without a length, counted by the calls of LiME's model that used it."""
    counted = cache.__dict__.get(_TOKEN_COUNT)
    if counted is not None and counted[0] is call:
        return counted[1]  # another (sub)model call of the same forward
    before = counted[2] if counted is not None else 0
    cache.__dict__[_TOKEN_COUNT] = (call, before, before + new_tokens)
    return before


def record_created_cache(cache: Any, new_tokens: int, call: object) -> None:
    """A call created its cache itself (none was passed in): count its tokens, when the cache keeps no length."""
    if cache is None or not hasattr(cache, "__dict__") or _TOKEN_COUNT in cache.__dict__:
        return
    if cache.__dict__.get("_lime_windows") is not None:
        return  # passed in (and followed), not created
    if cache_length(cache) is None:
        cache.__dict__[_TOKEN_COUNT] = (call, 0, new_tokens)
