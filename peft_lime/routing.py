"""Routing math of LiME as pure functions on tensors (no modules, no state).

Shapes: ``N`` tokens flattened over batch and time where that is all a function needs, ``(B, T, E)`` where the
time axis matters (windows). Everything here runs in float32: the routed slices are tiny (E channels per token),
so the cost is negligible and the softmax / sigmoid stay well conditioned under bf16 training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Floor of the adapter-term normaliser, relative to the frozen term's scale. LoRA starts with B = 0, so the adapter
# output is exactly zero at step 0: a normaliser with a tiny epsilon would scale the router's gradient by 1/epsilon
# (1e6 in the reference code). With this floor the adapter's opinion phases in smoothly as it grows past 1% of the
# frozen output, and the gradient factor stays bounded by 100 / scale_h.
ADAPTER_SCALE_FLOOR = 1e-2
_EPS = 1e-6


def routing_logits(
    frozen_slice: torch.Tensor,
    delta_slice: torch.Tensor,
    *,
    gamma: float,
    temperature: float,
    norm: str,
) -> torch.Tensor:
    """Parameter-free router logits from the first E channels of the frozen output and of the adapter output.

    ``norm="token"`` (default) normalises each token by its own RMS over the routed slice, so a token's logits
    never depend on the rest of the batch. ``norm="batch"`` divides by the max-abs over the whole tensor, as the
    reference code does; it is batch-dependent and exists only to reproduce published numbers.
    Scales carry no gradient: they only set the per-token temperature of the router.
    """
    if norm == "token":
        return _token_logits(frozen_slice, delta_slice, gamma, temperature)
    if norm != "batch":  # validated in LimeConfig; kept for direct callers of this function
        raise ValueError(f"routing_norm must be 'token' or 'batch', got {norm!r}")
    h = frozen_slice.float()
    d = delta_slice.float()
    scale_h = h.abs().amax().add(_EPS).detach()
    scale_d = d.abs().amax().add(_EPS).detach()
    return ((1.0 - gamma) * h / scale_h + gamma * d / scale_d) / temperature


# (gamma, temperature, E, device) -> (weight, bias) of the F.linear in _token_logits; a handful per process.
_SCALE_MAPS: dict[tuple[float, float, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_map(gamma: float, temperature: float, E: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (gamma, temperature, E, device)
    # While tracing, the map is built in the graph (constants): filling the cache there would recompile next call.
    if key not in _SCALE_MAPS or torch.compiler.is_compiling():
        c_h, c_d = (1.0 - gamma) / temperature, gamma / temperature
        floor2 = ADAPTER_SCALE_FLOOR**2
        # From the sums of squares (S_h, S_d) of the two slices to their squared scales over their squared
        # coefficients: v_h = (S_h / E + eps) / c_h^2, v_d = (S_d / E + floor^2 (S_h / E + eps)) / c_d^2.
        weight = torch.tensor([[1.0 / (E * c_h**2), 0.0], [floor2 / (E * c_d**2), 1.0 / (E * c_d**2)]])
        bias = torch.tensor([_EPS / c_h**2, floor2 * _EPS / c_d**2])
        if torch.compiler.is_compiling():
            return weight.to(device), bias.to(device)
        _SCALE_MAPS[key] = (weight.to(device), bias.to(device))
    return _SCALE_MAPS[key]


def _token_logits(h: torch.Tensor, d: torch.Tensor, gamma: float, temperature: float) -> torch.Tensor:
    """Token-norm logits c_h h / sqrt(m_h + eps) + c_d d / sqrt(m_d + floor^2 (m_h + eps)), m = mean square.

    Written as few ops as possible (decoding runs this once per layer and token, where each op costs its dispatch):
    both slices go through one (..., 2, E) tensor, both scales come from one sum of squares, one linear map and one
    rsqrt, and the weighted sum is one matmul. The stack also copies the slices, so autograd never keeps a view of
    the layer's full (N, d) output alive.
    """
    c_h, c_d = (1.0 - gamma) / temperature, gamma / temperature
    if c_h == 0.0 or c_d == 0.0:  # one term only: the folded form would divide by zero
        h, d = h.float(), d.float()
        with torch.no_grad():
            m_h = h.square().mean(-1, keepdim=True).add_(_EPS)
            inv_h = m_h.rsqrt().mul_(c_h)
            inv_d = d.square().mean(-1, keepdim=True).add_(m_h, alpha=ADAPTER_SCALE_FLOOR**2).rsqrt_().mul_(c_d)
        return h * inv_h + d * inv_d
    hd = torch.stack((h, d), dim=-2)  # (..., 2, E)
    if hd.dtype != torch.float32:
        hd = hd.float()
    weight, bias = _scale_map(gamma, temperature, hd.shape[-1], hd.device)
    with torch.no_grad():
        inv = F.linear(torch.linalg.vecdot(hd, hd), weight, bias).rsqrt_()  # (..., 2): c / scale of each term
    return torch.matmul(inv.unsqueeze(-2), hd).squeeze(-2)


def softmax_over_experts(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last (expert) dimension of (N, E) logits.

    PyTorch's CPU softmax vectorises along the reduced dimension, which is only E = 4..16 wide here: on (512, 8) it
    costs several times the same softmax taken over dim 0 of the (E, N) transpose, which vectorises over the tokens. The result
    is the transpose back (an (N, E) view of (E, N) storage); every element-wise op after it keeps that layout, so
    the next softmax over experts reads contiguous memory. Other devices (and compiled graphs) take the plain call.
    """
    if logits.shape[0] < 16 or logits.dim() != 2 or logits.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits.t(), dim=0).t()


def apply_jitter(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """Multiplicative jitter U(1 - eps, 1 + eps) on each logit (training only; the caller decides)."""
    if eps <= 0:
        return logits
    noise = torch.empty_like(logits).uniform_(1.0 - eps, 1.0 + eps)
    return logits * noise


def segment_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence index of every token of a packed / padding-free row: a new sequence starts where positions reset.

    A reset is a position that does not follow its predecessor by +1 (the first token of a row always starts one).
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def causal_window_mean(
    logits: torch.Tensor,
    n_gram: int,
    *,
    valid: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    past_logits: torch.Tensor | None = None,
    past_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal n-gram routing: token t uses the mean logits of tokens t-n+1..t of its own sequence.

    logits: (B, T, E). valid: (B, T) bool, False for padding (never averaged into another token's window).
    segments: (B, T) sequence ids for packed rows (windows never cross them). past_logits / past_valid:
    (B, n-1, E) / (B, n-1), the tail kept from earlier decoding steps of the same sequences.
    A token always counts itself, so padding tokens get a defined (unused) value.
    """
    if n_gram <= 1:
        return logits
    B, T, _ = logits.shape
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=logits.device)
    if segments is None:
        segments = torch.zeros(B, T, dtype=torch.long, device=logits.device)
    if past_logits is not None:
        P = past_logits.shape[1]
        # The cached tail belongs to the sequence of the first new token.
        all_logits = torch.cat([past_logits.to(logits.dtype), logits], dim=1)
        all_valid = torch.cat([past_valid, valid], dim=1)
        all_segments = torch.cat([segments[:, :1].expand(B, P), segments], dim=1)
    else:
        P = 0
        all_logits, all_valid, all_segments = logits, valid, segments
    total = logits.clone()
    count = torch.ones(B, T, 1, dtype=logits.dtype, device=logits.device)
    for k in range(1, n_gram):
        start = P - k
        if start + T <= 0:
            break
        # Source positions t - k for current positions t, clipped at the row's first token.
        lo = max(start, 0)
        dst = slice(lo - start, T)
        src = slice(lo, start + T)
        ok = all_valid[:, src] & (all_segments[:, src] == segments[:, dst])
        w = ok.unsqueeze(-1).to(logits.dtype)
        total[:, dst] = total[:, dst] + all_logits[:, src] * w
        count[:, dst] = count[:, dst] + w
    return total / count


def block_window_logits(logits: torch.Tensor, n_gram: int, positions: torch.Tensor) -> torch.Tensor:
    """Reference ("block") n-gram routing: each block of n tokens routes with its LAST token's logits.

    Non-causal (token 2k sees token 2k+1); kept only to reproduce the paper. positions: (B, T) position of each
    token inside its own sequence; blocks are [0, n), [n, 2n), ... of those positions and end at segment changes.
    """
    if n_gram <= 1:
        return logits
    B, T, E = logits.shape
    block = torch.div(positions, n_gram, rounding_mode="floor")
    # A block ends where the next token is in another block (or sequence), or at the row's end.
    is_last = torch.ones_like(block, dtype=torch.bool)
    is_last[:, :-1] = (block[:, 1:] != block[:, :-1]) | (positions[:, 1:] != positions[:, :-1] + 1)
    idx = torch.arange(T, device=logits.device).expand(B, T)
    last_idx = torch.where(is_last, idx, torch.full_like(idx, T))
    # Reverse cumulative min gives, for every token, the index of the last token of its block.
    last_idx = torch.flip(torch.cummin(torch.flip(last_idx, [1]), dim=1).values, [1])
    return torch.gather(logits, 1, last_idx.unsqueeze(-1).expand(B, T, E))


@dataclass
class Selection:
    """Mixing weights per token (rows sum to 1) and the hard mask of selected experts (for telemetry; None when
    the caller said it does not need it)."""

    weights: torch.Tensor
    selected: torch.Tensor | None


def select_experts(
    probs: torch.Tensor,
    *,
    top_k: int,
    auto_topk: bool,
    threshold: float,
    max_active: int | None,
    mode: str,
    selection_temperature: float,
    need_selected: bool = True,
    logits: torch.Tensor | None = None,
) -> Selection:
    """Turn routing probabilities (N, E) into mixing weights.

    Fixed top-k keeps the k largest; Auto Top-K keeps every expert with p >= threshold * max p (at most
    max_active). "hard" renormalises the kept probabilities; "soft" replaces the mask by
    sigmoid((p - cut) / selection_temperature) so every expert receives gradient.
    ``need_selected=False`` lets soft selection skip building the mask (``selected`` is then None) when nobody
    reads it (statistics paused). ``logits`` (those probs came from, same shape) let soft selection fold the
    renormalisation into one softmax: p * g / sum(p * g) = softmax(logits + log g).
    """
    E = probs.shape[-1]
    k = min(max_active, E) if (auto_topk and max_active is not None) else (top_k if not auto_topk else E)
    top_idx = None
    if auto_topk and k == E:
        # x = p - threshold * max p in one op (the common path: Auto Top-K without a cap needs no topk).
        x = torch.sub(probs, probs.amax(-1, keepdim=True), alpha=threshold)
    else:
        top = torch.topk(probs, k, dim=-1)
        top_idx, cut = top.indices, top.values[..., -1:]
        if auto_topk:
            cut = torch.maximum(probs.amax(-1, keepdim=True) * threshold, cut)
        x = probs - cut
    selected = None
    if mode == "hard" or need_selected:
        selected = x >= 0
        if top_idx is not None and k < E:
            # Ties at the cut could select more than k experts: keeping only the top-k indices makes the count exact
            # (the k indices topk returned are exactly the k highest ranks, so no second sort is needed).
            selected = selected & torch.zeros_like(selected).scatter_(-1, top_idx, True)
    if mode != "hard" and logits is not None:
        # log sigmoid(x / t) = softplus(x, beta=-1/t) / t: the gate's log in one op (and one add) instead of three.
        inv_t = 1.0 / selection_temperature
        gated = torch.add(logits, F.softplus(x, beta=-inv_t), alpha=inv_t)
        return Selection(weights=softmax_over_experts(gated), selected=selected)
    if mode == "hard":
        weights = probs * selected
    else:
        weights = probs * torch.sigmoid(x * (1.0 / selection_temperature))
    # The kept weights always include the largest probability (>= 1/E, with gate >= 1/2 in soft mode), so the sum
    # is bounded away from 0 and needs no clamp.
    weights = weights / weights.sum(-1, keepdim=True)
    return Selection(weights=weights, selected=selected)


def balance_terms(probs: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load-balancing terms over the valid tokens: (importance, kl_uniform, mean_probs).

    See ``balance_terms_of_mean`` for the terms; probs: (N, E); valid: (N,) bool or None.
    """
    if valid is not None:
        w = valid.to(probs.dtype)
        n_valid = w.sum()
        pbar = (w @ probs) / n_valid.clamp_min(1.0)
        importance, kl = balance_terms_of_mean(pbar)
        # No valid token (an all-padding call): pbar is 0 and both terms are 0, not importance = -1.
        importance = importance * (n_valid > 0).to(probs.dtype)
    else:
        pbar = probs.mean(0)
        importance, kl = balance_terms_of_mean(pbar)
    return importance, kl, pbar


def balance_terms_of_mean(pbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance, kl_uniform) of mean routing probabilities pbar (E,), wherever they were averaged.

    importance = E * sum_i pbar_i^2 - 1 (squared coefficient of variation of pbar, 0 when uniform);
    kl_uniform = sum_i pbar_i * log(E * pbar_i) = KL(pbar || uniform).
    """
    E = pbar.shape[-1]
    importance = torch.dot(pbar, pbar) * E - 1.0
    kl = torch.dot(pbar, torch.log(pbar.clamp_min(1e-12) * E))
    return importance, kl


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy divided by log(E): 0 for a one-hot route, 1 for a uniform one. probs: (N, E)."""
    E = probs.shape[-1]
    if E == 1:
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
    return ent / math.log(E)
