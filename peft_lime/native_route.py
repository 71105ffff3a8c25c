"""LiME's routing and modulation of one layer as ONE native CPU call, for no-grad calls (decoding, evaluation).

Eager decoding runs LimeLayer._route and the modulation once per layer and token: about forty tensor ops on an (1, E)
and a (1, d) tensor, whose dispatch (~1-2 us each, plus the Python around them), not their arithmetic, is LiME's
cost over plain LoRA (benchmarks/layer_ops.py). ``csrc/lime_route.c`` does the same math in one call: token-norm
logits, softmax, Auto Top-K / top-k selection (soft or hard) and y = out + delta * (1 + g p_s + mix @ W). Large
no-grad calls (evaluation batches, long prompts), whose modulation is one GEMM (low_rank_mix.py), take the kernel's
weights-only entry: the ~20 routing ops on (N, E) tensors become one call.

How it is built: with the system C compiler, once per machine, into a cache folder (native_build.py), together with
the low-rank modulation of native_low_rank.py, and loaded with ctypes. Where no compiler works, the layers keep
their eager path (logged once at debug level).

When it runs (``modulate`` / ``weights`` return None otherwise, and the layer takes its eager path, which is also
the reference the tests compare it with at 1e-5): grad mode off, the layer in eval mode, not inside torch.export or a
trace (inside torch.compile through the custom ops of native_ops.py, soft selection only); float32 contiguous CPU tensors; ``routing_mode="token"``, ``routing_norm="token"``, no window (n_gram 1,
not prefix); no routing statistics being recorded, no weights capture, no static routing; E <= 64. Hard top-k
selection with a tie at the cut falls back too (which tied expert torch.topk keeps is not specified). Training keeps
the torch ops for the routing (autograd needs them; the region of fused_route.py is the opt-in for that); its
low-rank modulation, forward and backward, is native too (native_low_rank.py).

Switch: on by default; ``PEFT_LIME_NATIVE=0`` or ``set_native(False)`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from functools import lru_cache
from typing import Any, Optional

import torch

from .native_build import FLAG_SETS, build, cache_dir, compile_library, compiler_command  # noqa: F401
from .routing import _EPS, ADAPTER_SCALE_FLOOR

LOGGER = logging.getLogger(__name__)
ENV_VAR = "PEFT_LIME_NATIVE"
MAX_EXPERTS = 64  # LIME_MAX_EXPERTS in the C source: per-token scratch arrays live on the stack
_FLOAT = torch.float32
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_P, _F, _L, _I = ctypes.c_void_p, ctypes.c_float, ctypes.c_long, ctypes.c_int
_ARGTYPES = [_P, _P, _F, _P, _P, _P, _P, _P, _L, _L, _L, _F, _F, _F, _F, _L, _I, _F, _I, _F, _P]
_WEIGHTS_ARGTYPES = [_P, _L, _P, _L, _L, _L, _F, _F, _F, _F, _L, _I, _F, _I, _F, _P, _I]
_LOW_RANK_ARGTYPES = [_P] * 6 + [_L] * 4 + [_F, _I]
_LOW_RANK_BACKWARD_ARGTYPES = [_P] * 9 + [_L] * 4 + [_F, _I]
_TRAIN_ARGTYPES = [_P, _L, _P, _L, _P, _L, _L, _F, _F, _F, _F, _F, _F, _P, _P, _P, _I]
_TRAIN_BACKWARD_ARGTYPES = [_P] * 6 + [_L, _L, _F, _F, _P, _P, _I]
_STATS_ARGTYPES = [_P] * 4 + [_L, _L] + [_P] * 10
_BALANCE_ARGTYPES = [_P, _P, _L, _L, _F, _F, _F, _P]
_BALANCE_BACKWARD_ARGTYPES = [_P, _P, _L, _L, _F, _F, _F, _F, _P]
# Every entry of the library (csrc/*.c) and its argument types; each returns an int status.
_SIGNATURES = {
    "lime_route_modulate": _ARGTYPES, "lime_route_weights": _WEIGHTS_ARGTYPES,
    "lime_low_rank_modulate": _LOW_RANK_ARGTYPES, "lime_low_rank_backward": _LOW_RANK_BACKWARD_ARGTYPES,
    "lime_route_train_forward": _TRAIN_ARGTYPES, "lime_route_train_backward": _TRAIN_BACKWARD_ARGTYPES,
    "lime_stats_record": _STATS_ARGTYPES,
    "lime_balance_forward": _BALANCE_ARGTYPES, "lime_balance_backward": _BALANCE_BACKWARD_ARGTYPES,
}


def env_switch(value: Optional[str]) -> bool:
    """Whether a ``PEFT_LIME_NATIVE`` value leaves the native path on (unset: on; 0 / false / off / no: off)."""
    return value is None or value.strip().lower() not in ("0", "false", "off", "no")


_enabled: bool = env_switch(os.environ.get(ENV_VAR))
_kernel: Any = None
_weights_kernel: Any = None
low_rank_kernels: Any = None  # (lime_low_rank_modulate, lime_low_rank_backward) once loaded: native_low_rank.py
train_kernels: Any = None  # (lime_route_train_forward, lime_route_train_backward): native_train_route.py
stats_kernel: Any = None  # lime_stats_record: native_stats.py
balance_kernels: Any = None  # (lime_balance_forward, lime_balance_backward): native_balance.py
library: Optional[ctypes.CDLL] = None  # the loaded library (its file: library._name)
_state = "unloaded"  # "unloaded" -> "ready" | "failed"
_lock = threading.Lock()


def set_native(enabled: bool) -> None:
    """Turn the native decoding path on or off for this process (overrides ``PEFT_LIME_NATIVE``)."""
    global _enabled
    _enabled = bool(enabled)


def available() -> bool:
    """Whether the native library is built and loaded (building it on the first call); False where that failed."""
    global _kernel, _weights_kernel, low_rank_kernels, train_kernels, stats_kernel, balance_kernels, library, _state
    if _state == "unloaded":
        with _lock:
            if _state == "unloaded":
                try:
                    loaded = _load()
                    entry = {name: getattr(loaded, name) for name in _SIGNATURES}
                    for name, argtypes in _SIGNATURES.items():
                        entry[name].argtypes, entry[name].restype = argtypes, ctypes.c_int
                    _kernel, _weights_kernel = entry["lime_route_modulate"], entry["lime_route_weights"]
                    low_rank_kernels = entry["lime_low_rank_modulate"], entry["lime_low_rank_backward"]
                    train_kernels = entry["lime_route_train_forward"], entry["lime_route_train_backward"]
                    stats_kernel = entry["lime_stats_record"]
                    balance_kernels = entry["lime_balance_forward"], entry["lime_balance_backward"]
                    library = loaded
                    _state = "ready"
                except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # RuntimeError: no home folder
                    LOGGER.debug("peft_lime: native routing kernel unavailable, eager path used: %s", err)
                    _state = "failed"
    return _state == "ready"


def _load() -> ctypes.CDLL:
    """The first library of FLAG_SETS that builds and loads (an OpenMP build may not load beside another runtime)."""
    compiler, error = compiler_command(), None
    for flags in FLAG_SETS:
        try:
            return ctypes.CDLL(str(compile_library(compiler, flags)))
        except (OSError, subprocess.SubprocessError) as err:
            error = err
    raise OSError(f"no build of the native library loads: {error}")


def reset() -> None:
    """Forget the loaded kernel (and a failure): the next call builds / loads it again."""
    global _kernel, _weights_kernel, low_rank_kernels, train_kernels, stats_kernel, balance_kernels, library, _state
    _kernel = _weights_kernel = low_rank_kernels = train_kernels = stats_kernel = balance_kernels = library = None
    _state = "unloaded"


@lru_cache(maxsize=256)
def _plan(s: Any) -> Optional[tuple]:
    """The kernel's constants for routing settings ``s`` (a frozen, hashable LimeRoutingSettings), or None when the
    kernel does not cover them."""
    plain = s.routing_mode == "token" and s.routing_norm == "token" and s.n_gram == 1 and s.ngram_mode != "prefix"
    E = s.num_experts
    if not plain or E > MAX_EXPERTS:
        return None
    c_h, c_d = (1.0 - s.routing_gamma) / s.temperature, s.routing_gamma / s.temperature
    auto = s.auto_topk
    k = min(s.max_active_experts, E) if (auto and s.max_active_experts is not None) else (E if auto else s.top_k)
    hard = s.selection == "hard"
    return (E, c_h, c_d, ADAPTER_SCALE_FLOOR**2, _EPS, k, int(auto), s.auto_topk_threshold, int(hard),
            1.0 / s.selection_temperature)


# Tokens per call from which the per-token routing kernels share the tokens among torch's intra-op threads: each token
# is a few dozen transcendental functions (a 512-token training call took 145 us on one thread, 84 us on two).
PARALLEL_TOKENS = 256


def parallel_threads(n_tokens: int) -> int:
    """Threads for a per-token kernel call of ``n_tokens`` tokens: torch's intra-op count for large calls, else 1."""
    return torch.get_num_threads() if n_tokens >= PARALLEL_TOKENS else 1


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def plain_float_cpu(t: torch.Tensor) -> bool:
    """Whether the native library may read ``t`` by pointer: a float32 CPU tensor of a plain class (a subclass such
    as a DTensor shard or a FakeTensor may not hold its values at data_ptr())."""
    return type(t) in _PLAIN and t.dtype == _FLOAT and t.is_cpu  # is_cpu: no device object built (decoding asks often)


def traced_native(*tensors: torch.Tensor) -> bool:
    """Whether a model being compiled (torch.compile, not torch.export) calls the kernels through their custom ops
    (native_ops.py) for these tensors: the switch on, float32 CPU tensors, the library loaded, no torch.distributed
    process group (see native_low_rank.in_distributed_run). Read while dynamo traces: a constant of the graph."""
    if not (torch.compiler.is_compiling() and _enabled) or torch.compiler.is_exporting():
        return False
    if not all(t.dtype == _FLOAT and t.device.type == "cpu" for t in tensors):
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) and _library_ready()


@torch.compiler.assume_constant_result
def _library_ready() -> bool:
    # Run (not traced) by dynamo, which loads the library then if no eager call has yet; the result is baked in.
    return available()


def _plan_of_call(layer: Any, adapter: str, tensors: tuple[torch.Tensor, ...]) -> Optional[tuple]:
    """The kernel's constants for this call of ``layer``, or None where the kernel does not apply to it."""
    if not _enabled or torch.is_grad_enabled() or layer.training or torch.jit.is_tracing():
        return None
    traced = torch.compiler.is_compiling()
    # _plan's own function while dynamo traces: a constant per settings object (its cache is not traceable state).
    plan = (_plan.__wrapped__ if traced else _plan)(layer.lime_routing[adapter])
    if plan is None or adapter in layer.lime_static_routing or layer._context.weights_capture is not None:
        return None
    if layer.lime_stats[adapter].enabled and layer._context.records_stats(False):
        return None
    if traced:  # hard selection may decline a call (a tie at the cut), which an op inside a graph cannot
        return plan if not plan[8] and traced_native(*tensors) else None
    if not all(plain_float_cpu(t) and t.is_contiguous() for t in tensors) or not available():
        return None
    return plan


def modulate_kernel(
    h: torch.Tensor, out: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, shared: Optional[torch.Tensor],
    gate: Optional[torch.Tensor], plan: tuple, delta_scale: float = 1.0,
) -> Optional[torch.Tensor]:
    """The kernel's y for contiguous float32 CPU tensors of one shape (h, out, delta), or None if it declined; the
    adapter output is ``delta * delta_scale``."""
    E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t = plan
    width = out.shape[-1]
    y = torch.empty_like(out)
    status = _kernel(
        h.data_ptr(), delta.data_ptr(), delta_scale, out.data_ptr(), y.data_ptr(), weight.data_ptr(), _ptr(shared),
        _ptr(gate),
        out.numel() // width, width, E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t, None,
    )
    return y if status == 0 else None


def weights_kernel(h: torch.Tensor, delta_slice: torch.Tensor, plan: tuple) -> Optional[torch.Tensor]:
    """The kernel's (N, E) mixing weights for contiguous float32 CPU h (..., d) and delta_slice (..., E), or None."""
    E, c_h, c_d, floor2, eps, k, auto, threshold, hard, inv_t = plan
    n_tokens = delta_slice.numel() // E
    mix = torch.empty(n_tokens, E, dtype=_FLOAT)
    status = _weights_kernel(h.data_ptr(), h.shape[-1], delta_slice.data_ptr(), E, n_tokens, E, c_h, c_d, floor2, eps,
                             k, auto, threshold, hard, inv_t, mix.data_ptr(), parallel_threads(n_tokens))
    return mix if status == 0 else None


def modulate(
    layer: Any, adapter: str, h: torch.Tensor, out: torch.Tensor, delta: torch.Tensor, delta_scale: float = 1.0
) -> Optional[torch.Tensor]:
    """out + delta * modulation for one adapter of ``layer`` through the kernel, or None where it does not apply
    (the caller then runs its eager path). h: the frozen output; the adapter output is ``delta * delta_scale`` (a
    low-rank adapter passes its scaling here: no separate multiply per layer and token); same shape as out.
    In a compiled model: its custom op (native_ops.py)."""
    experts = layer.lime_experts[adapter]
    weight, shared, gate = experts.weight, experts.shared, experts.gate
    tensors = (h, out, delta, weight) if shared is None else (h, out, delta, weight, shared, gate)
    if delta.shape != out.shape or h.shape != out.shape:
        return None
    plan = _plan_of_call(layer, adapter, tensors)
    if plan is None:
        return None
    if torch.compiler.is_compiling():
        return torch.ops.peft_lime.route_modulate(h, out, delta, weight, shared, gate, *plan, delta_scale)
    return modulate_kernel(h, out, delta, weight, shared, gate, plan, delta_scale)


def weights(layer: Any, adapter: str, h: torch.Tensor, delta_slice: torch.Tensor) -> Optional[torch.Tensor]:
    """The mixing weights (N, E) of one adapter of ``layer`` through the kernel, for large calls whose modulation is
    one GEMM (low_rank_mix.py), or None where the kernel does not apply. h: the frozen output (..., d); delta_slice:
    the adapter output's routed slice (..., E). In a compiled model: its custom op (native_ops.py)."""
    plan = _plan_of_call(layer, adapter, (h, delta_slice))
    if plan is None or delta_slice.shape[-1] != plan[0] or h.numel() // h.shape[-1] != delta_slice.numel() // plan[0]:
        return None
    if torch.compiler.is_compiling():
        return torch.ops.peft_lime.route_weights(h, delta_slice, *plan)
    return weights_kernel(h, delta_slice, plan)
