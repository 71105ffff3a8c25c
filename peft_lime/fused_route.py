"""One LiME layer's routing math as ONE compiled region, for eager models (the whole model is not compiled).

In eager mode the routing of one layer call (logits, jitter, causal window, softmax, selection, balance terms) is
about twenty small kernels; in decoding and at many layers their dispatch, not their arithmetic, is LiME's cost over
plain LoRA. ``route`` runs that math as one ``torch.compile``d function (inductor, ``dynamic=True``,
``fullgraph=True``): one compilation per process and per structural setting, shared by every layer and adapter.

What is compiled: ``_route_math`` (pure: tensors in, tensors out, no state), which repeats routing.py's math op for
op. What stays eager, in ``route``: the jitter noise draw (the same ``uniform_`` call on the same shape as
``routing.apply_jitter``, so the RNG stream is today's), the decode windows (``DecodeWindows.get`` / ``keep``), the
balance schedule (``balance_due``), statistics recording and the aux bookkeeping; the aux term is injected by the
layer as before.

Guards (what makes a new graph). Float settings (gamma, temperature, thresholds, loss coefficients) are one tensor
input (``_params``): never a recompile. Sizes are dynamic (batch, length, E) and compiled
without duck shaping, except that dynamo specialises sizes and storage offsets 0 / 1: a batch of 1, a one-token call
(decoding), and, with n_gram > 1, the kept tail from the second decoding step on, each compile once. Python constants,
one graph per distinct value: n_gram, top-k, soft / hard, Auto Top-K with or without a cap, whether balance terms
are due, whether decoding windows are kept, the None-ness of the mask / segments / past tails / noise, grad mode,
dtype and device. Typical use builds four graphs per setting (training, eval / prefill, first and later decoding
steps). ``RECOMPILE_LIMIT`` bounds them; past it, or when the compiler fails, the layers take their eager path.

Switch: off by default; ``PEFT_LIME_FUSED=1`` or ``set_fused(True)`` turns it on. The layer keeps its eager path
where this is off, where the compiler failed once in this process (logged at debug level), while the whole model is
being compiled (the outer graph then sees plain ops), and for settings this function does not cover:
``routing_norm="batch"``, ``ngram_mode="block"``, ``balance_scope="global"`` and every ``routing_mode`` but "token".
No-grad calls that the native kernel covers (native_route.py) take it before this region.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as shape_config

from .balance import balance_due
from .layout import TokenLayout
from .routing import _EPS, ADAPTER_SCALE_FLOOR

LOGGER = logging.getLogger(__name__)
ENV_VAR = "PEFT_LIME_FUSED"
# Graphs one process may build for this region: a few per structural setting in use (train / eval / decode).
RECOMPILE_LIMIT = 64
# The compiler backend: inductor fuses the region into a few kernels (tests may swap in "aot_eager", see reset).
BACKEND = "inductor"


def env_switch(value: Optional[str]) -> bool:
    """Whether a ``PEFT_LIME_FUSED`` value turns the fused region on (1 / true / on / yes; else off). Off by default:
    within noise of the eager path on a 2-core CPU (benchmarks/results/efficiency_fused.md)."""
    return value is not None and value.strip().lower() in ("1", "true", "on", "yes")


_enabled: bool = env_switch(os.environ.get(ENV_VAR))
_compiled: Optional[Callable[..., Any]] = None
_broken = False  # the compiler failed once in this process: eager from then on


def set_fused(enabled: bool) -> None:
    """Turn the fused routing region on or off for this process (overrides ``PEFT_LIME_FUSED``)."""
    global _enabled
    _enabled = bool(enabled)


def reset() -> None:
    """Drop the compiled region and a recorded compiler failure: the next call compiles again (with ``BACKEND``)."""
    global _compiled, _broken
    _compiled, _broken = None, False


def fused_enabled() -> bool:
    """Whether layers route through the compiled region now (not inside a compile, switch on, compiler usable).
    is_compiling first: a compiled model then never reads (nor guards on) this module's switches."""
    return not torch.compiler.is_compiling() and _enabled and not _broken and not torch.jit.is_tracing()


def supports(s: Any) -> bool:
    """Whether this call of a layer with these routing settings takes the fused region."""
    plain = s.routing_mode == "token" and s.routing_norm == "token" and s.ngram_mode == "causal"
    return fused_enabled() and plain and s.balance_scope != "global"


def _window_mean(
    seq: torch.Tensor, n: int, valid: Optional[torch.Tensor], *rest: Optional[torch.Tensor]
) -> torch.Tensor:
    """routing.causal_window_mean without branches on the length: the row is led by n - 1 slots (the kept tail,
    zero-padded in front, or only padding), so every source slice has the length T and no guard depends on T.
    Out-of-row sources are zeros with weight 0, which add exactly nothing, so the sums equal the eager ones."""
    segments, past, past_valid = rest  # (B, T), (B, P, E), (B, P) or None
    B, T, E = seq.shape
    lead = n - 1
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=seq.device)
    pad = lead if past is None else lead - past.shape[1]
    parts, parts_valid = [seq.new_zeros(B, pad, E)], [valid.new_zeros(B, pad)]
    if past is not None:
        parts.append(past.to(seq.dtype))
        parts_valid.append(past_valid)
    all_logits = torch.cat([*parts, seq], 1)
    all_valid = torch.cat([*parts_valid, valid], 1)
    # The kept tail belongs to the sequence of the first new token (as in routing.causal_window_mean).
    all_segments = torch.cat([segments[:, :1].expand(B, lead), segments], 1) if segments is not None else None
    total, count = seq, None
    for k in range(1, n):
        ok = all_valid[:, lead - k : lead - k + T]
        if all_segments is not None:
            ok = ok & (all_segments[:, lead - k : lead - k + T] == segments)
        w = ok.unsqueeze(-1).to(seq.dtype)
        total = total + all_logits[:, lead - k : lead - k + T] * w
        count = w + 1.0 if count is None else count + w
    return total / count


def _route_math(
    hd: torch.Tensor,
    noise: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
    segments: Optional[torch.Tensor],
    past: Optional[torch.Tensor],
    past_valid: Optional[torch.Tensor],
    params: torch.Tensor,
    k: int,
    n_gram: int,
    flags: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """hd: (..., 2, E) the routed slices of the frozen and adapter outputs.

    Returns (weights (N, E), probs (N, E), selected mask (N, E), aux or None, pre-window logits (B, T, E) or None).

    The math of LimeLayer._route (routing.py) for routing_norm="token", causal windows, micro-batch balance.
    flags: (hard selection, Auto Top-K without topk, Auto Top-K, topk restricts the mask, balance due, pre-window
    logits wanted). The selection mask is always built (for the statistics): inside the fused kernel it costs a
    compare per element, and one graph then serves calls with and without statistics.
    """
    hard, auto_all, auto, restrict, balance, keep_raw = flags
    c_h, c_d, threshold, inv_t, coef_imp, coef_kl, n_layers = params.unbind()
    E = hd.shape[-1]
    hd = hd.float()
    h, d = hd.select(-2, 0), hd.select(-2, 1)
    # routing._token_logits: per-token scales from the sums of squares, without gradient.
    m_h = h.detach().square().mean(-1, keepdim=True) + _EPS
    inv_d = (d.detach().square().mean(-1, keepdim=True) + ADAPTER_SCALE_FLOOR**2 * m_h).rsqrt() * c_d
    logits = h * (m_h.rsqrt() * c_h) + d * inv_d
    if noise is not None:
        logits = logits * noise
    raw = None
    if n_gram > 1:
        raw = logits if logits.dim() == 3 else logits.reshape(1, -1, E)
        logits = _window_mean(raw, n_gram, valid, segments, past, past_valid)
    logits = logits.reshape(-1, E)
    probs = torch.softmax(logits, -1)
    # routing.select_experts
    top_idx = None
    if auto_all:
        x = probs - probs.amax(-1, keepdim=True) * threshold
    else:
        top = torch.topk(probs, k, dim=-1)
        top_idx, cut = top.indices, top.values[..., -1:]
        if auto:
            cut = torch.maximum(probs.amax(-1, keepdim=True) * threshold, cut)
        x = probs - cut
    selected = x >= 0
    if restrict:
        selected = selected & torch.zeros_like(selected).scatter(-1, top_idx, True)
    if hard:
        weights = probs * selected
        weights = weights / weights.sum(-1, keepdim=True)
    else:
        # softmax(logits + log sigmoid(x / t)): the renormalised soft gate (routing.select_experts' folded form).
        weights = torch.softmax(logits + F.logsigmoid(x * inv_t), -1)
    aux = None
    if balance:
        # routing.balance_terms, with sums instead of the (N,) @ (N, E) product: inductor decomposes small matrix
        # products by size, which would put a guard on the number of tokens.
        if valid is None:
            pbar = probs.mean(0)
        else:
            w = valid.reshape(-1, 1).to(probs.dtype)
            n_valid = w.sum()
            pbar = (w * probs).sum(0) / n_valid.clamp_min(1.0)
        importance = (pbar * pbar).sum() * E - 1.0
        if valid is not None:  # no valid token (an all-padding call): both terms 0, not importance = -1
            importance = importance * (n_valid > 0).to(probs.dtype)
        kl = (pbar * torch.log(pbar.clamp_min(1e-12) * E)).sum()
        aux = (coef_imp * importance + coef_kl * kl) / n_layers
    return weights, probs, selected, aux, raw if keep_raw else None


# (settings, layers, device) -> the float settings as one tensor input of the region; a handful per process.
_PARAMS: dict[tuple[Any, int, torch.device], torch.Tensor] = {}


def _params(s: Any, n_layers: int, device: torch.device) -> torch.Tensor:
    """(c_h, c_d, threshold, 1 / selection temperature, importance coef, kl coef, layers) as one (7,) tensor: float
    arguments would be wrapped into new tensors at every call (seven small ops, decoding pays per op), and as
    constants they would compile once per value."""
    key = (s, n_layers, device)
    if key not in _PARAMS:
        gamma, tau = s.routing_gamma, s.temperature
        values = [(1.0 - gamma) / tau, gamma / tau, s.auto_topk_threshold, 1.0 / s.selection_temperature]
        values += [s.importance_loss_coef, s.kl_loss_coef, float(n_layers)]
        _PARAMS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _PARAMS[key]


def _compiled_math() -> Callable[..., Any]:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_route_math, backend=BACKEND, dynamic=True, fullgraph=True,
                                  recompile_limit=RECOMPILE_LIMIT, isolate_recompiles=True)
    return _compiled


def _run(*args: Any) -> tuple:
    """The compiled math; on any failure of the compiler, the same math uncompiled (the noise is already drawn, so
    the RNG stream stays today's) and the eager layer path from then on."""
    global _broken
    # Without duck shaping while this region compiles: dynamo would otherwise give input sizes that happen to be equal
    # at the first call one symbol (e.g. a batch of 2 and the stacked pair, a length of 8 and E = 8) and compile again
    # when they differ. Read only when a graph is built; every other compile of the process keeps the setting.
    duck_shape = shape_config.use_duck_shape
    shape_config.use_duck_shape = False
    try:
        return _compiled_math()(*args)
    except Exception as error:  # noqa: BLE001 - no C++ compiler, unsupported device, recompile limit, ...
        _broken = True
        LOGGER.debug("LiME fused routing unavailable, using the eager path: %s", error, exc_info=True)
        return _route_math(*args)
    finally:
        shape_config.use_duck_shape = duck_shape


def route(
    layer: Any,
    adapter: str,
    h_slice: torch.Tensor,
    delta_slice: torch.Tensor,
    layout: Optional[TokenLayout],
    record: bool,
    first_pass: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """LimeLayer._route for routing_mode="token" through the compiled region: (weights (N, E), aux or None).

    The eager bookkeeping around the math is LimeLayer._route's, in the same order of side effects.
    """
    s = layer.lime_routing[adapter]
    E, training = s.num_experts, layer.training
    noise = None
    if training and s.jitter_noise > 0:  # routing.apply_jitter's draw: same call, shape and dtype
        noise = torch.empty(h_slice.shape, dtype=torch.float32, device=h_slice.device)
        noise.uniform_(1.0 - s.jitter_noise, 1.0 + s.jitter_noise)
    valid, segments = (layout.valid, layout.segments) if layout is not None else (None, None)
    past, keep = None, False
    if s.n_gram > 1:
        if layout is not None and layout.continuing:
            rows = h_slice.shape[0] if h_slice.dim() == 3 else 1
            past = layer._context.windows.get((id(layer), adapter), rows, s.n_gram)
        keep = layout is not None and not training
    else:
        valid = valid if training else None  # only the balance terms read the mask then
    balance = training and balance_due(layer, adapter, s.balance_interval, first_pass)
    k = min(s.max_active_experts, E) if (s.auto_topk and s.max_active_experts is not None) else s.top_k
    auto_all = s.auto_topk and (s.max_active_experts is None or k == E)
    n_layers = max(layer._context.layers_per_adapter.get(adapter, 1), 1)
    flags = (s.selection == "hard", auto_all, s.auto_topk, not auto_all and k < E, balance, keep)
    # The two slices stacked eagerly (as routing._token_logits does): one input that requires grad whenever the adapter
    # trains (the frozen output of the first layers does not, which would otherwise make a second graph), and a copy,
    # so autograd keeps no view of the layer's (N, d) output alive.
    weights, probs, selected, aux, raw = _run(
        torch.stack((h_slice, delta_slice), dim=-2),
        noise,
        valid,
        segments,
        *(past if past is not None else (None, None)),
        _params(s, n_layers, h_slice.device),
        k if not auto_all else E,
        s.n_gram,
        flags,
    )
    if keep:
        layer._context.windows.keep((id(layer), adapter), raw, layout.valid, past, s.n_gram)
    if aux is not None:
        if first_pass:
            layer.lime_stats[adapter].record_aux(aux)
        if not (torch.is_grad_enabled() and (s.importance_loss_coef or s.kl_loss_coef)):
            aux = None
    if record:
        flat_valid = layout.valid.reshape(-1) if layout is not None and layout.valid is not None else None
        tasks = layer._token_tasks(layout, probs.shape[0])
        layer.lime_stats[adapter].record(probs, selected, flat_valid, token_tasks=tasks)
    return weights, aux
