"""Prefix routing (``ngram_mode="prefix"``): every token routes with the mean logits of its sequence's opening.

With ``n_gram = n``, token t of a sequence uses the mean logits of the sequence's first min(t + 1, n) tokens: the
first n tokens pool causally over what came before them, every later token reuses the mean of the first n. A
sequence-level route, decided by how the sequence opens (an instruction, a task word, a system prompt): on
multi-task data the opening names the task while the tokens that follow mostly do not, and a per-token or trailing-
window route then follows the content instead (on the separation benchmark the k-means clusters of 8-token trailing
windows followed the digits, not the task).

Causal (a token never sees a later one), batch and padding invariant (only valid tokens of the token's own packed
segment count) and cache-consistent: decoding keeps, per sequence, the sum of the opening's logits and how many
tokens it holds (at most n), so a decoded token reuses exactly what a full forward computes.
"""

from __future__ import annotations

from typing import Optional

import torch


def prefix_mean(
    logits: torch.Tensor,
    n_prefix: int,
    *,
    valid: Optional[torch.Tensor] = None,
    segments: Optional[torch.Tensor] = None,
    past_sum: Optional[torch.Tensor] = None,
    past_count: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix-pooled logits of (B, T, E) ``logits``, and the opening state of each row's LAST segment.

    valid: (B, T) bool, False for padding; segments: (B, T) packed-sequence ids (non-decreasing along a row);
    past_sum / past_count: (B, E) / (B,) opening state of the sequences this call continues (decoding), which
    belongs to each row's first segment. A token whose opening holds no valid token (padding) keeps its own logits.
    Returns (pooled (B, T, E), opening sum (B, E), opening count (B,)) of each row's last segment, for decoding.
    """
    B, T, E = logits.shape
    dev = logits.device
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    if segments is None:
        segments = torch.zeros(B, T, dtype=torch.long, device=dev)
    idx = torch.arange(T, device=dev).expand(B, T)
    new_seg = torch.ones(B, T, dtype=torch.bool, device=dev)
    new_seg[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start = torch.cummax(torch.where(new_seg, idx, torch.zeros_like(idx)), dim=1).values  # first index of segment
    first_seg = segments == segments[:, :1]
    # Valid tokens of the segment up to and including t (plus the cached ones for the continued first segment).
    v = valid.long()
    cum_v = v.cumsum(1)
    rank = cum_v - torch.gather(cum_v - v, 1, start)
    if past_count is not None:
        rank = rank + torch.where(first_seg, past_count.to(dev).long().unsqueeze(1), torch.zeros_like(rank))
    in_opening = valid & (rank <= n_prefix)
    w = in_opening.unsqueeze(-1).to(logits.dtype)
    cum = (logits * w).cumsum(1)
    excl = cum - logits * w
    seg_sum = cum - torch.gather(excl, 1, start.unsqueeze(-1).expand(B, T, E))
    seg_count = rank.clamp(max=n_prefix).to(logits.dtype)
    if past_sum is not None:
        seg_sum = seg_sum + first_seg.unsqueeze(-1).to(logits.dtype) * past_sum.to(logits.dtype).unsqueeze(1)
    has = valid & (seg_count > 0)
    pooled = torch.where(has.unsqueeze(-1), seg_sum / seg_count.clamp_min(1).unsqueeze(-1), logits)
    # The opening state of the last segment: its running sum and count at the row's last position.
    last_sum = seg_sum[:, -1] if T else torch.zeros(B, E, dtype=logits.dtype, device=dev)
    last_count = seg_count[:, -1] if T else torch.zeros(B, dtype=logits.dtype, device=dev)
    if T == 0 and past_sum is not None:
        last_sum, last_count = past_sum.to(logits.dtype), past_count.to(logits.dtype)
    return pooled, last_sum, last_count
