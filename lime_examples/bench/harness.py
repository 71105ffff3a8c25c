"""Measurement helpers of the efficiency benchmark: train steps, decoding, peak memory, op profiles.

Everything takes an already built ``Trained`` bundle (model + AdamW + aux-loss hook + batch), so the benchmark can
keep every method alive in one process and interleave their measurements.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

AuxFn = Callable[[], Optional[torch.Tensor]]


@dataclass
class Trained:
    """One method ready to train: model, optimizer, optional extra loss (router balance) and the fixed batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    aux: Optional[AuxFn]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def make_trained(
    model: nn.Module, aux: Optional[AuxFn], input_ids: torch.Tensor, attention_mask: torch.Tensor, lr: float = 1e-4
) -> Trained:
    """AdamW (PyTorch defaults, foreach where available) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return Trained(model, torch.optim.AdamW(params, lr=lr), aux, input_ids, attention_mask)


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(t: Trained) -> float:
    """Forward (causal-LM loss + router balance loss), backward, AdamW step; returns the loss."""
    out = t.model(input_ids=t.input_ids, attention_mask=t.attention_mask, labels=t.input_ids)
    loss = out.loss
    if t.aux is not None:
        extra = t.aux()
        if extra is not None:
            loss = loss + extra
    loss.backward()
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def time_train_steps(t: Trained, steps: int) -> list[float]:
    """Wall-clock seconds of ``steps`` consecutive train steps (device synchronised around each)."""
    t.model.train()
    device = t.input_ids.device
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        train_step(t)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy generation with KV cache of exactly ``new_tokens`` tokens."""
    return model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=2,
    )


def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(seconds to generate 1 token, seconds to generate ``new_tokens``) from the same prompt, eval mode.

    Per-token decode latency is (t_n - t_1) / (n - 1): the prefill and the first token cancel out.
    """
    model.eval()
    device = prompt.device
    out = []
    for n in (1, new_tokens):
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            generated = generate(model, prompt, n)
        sync(device)
        out.append(time.perf_counter() - start)
        if generated.shape[1] != prompt.shape[1] + n:
            raise RuntimeError(f"generate produced {generated.shape[1] - prompt.shape[1]} tokens, expected {n}")
    return out[0], out[1]


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and storage.nbytes() > 0:
            seen.add(key)
            total += storage.nbytes()
    return total


def _state_tensors(t: Trained) -> Iterator[torch.Tensor]:
    """Tensors alive between steps: parameters, buffers, optimizer state, LiME's on-device routing statistics."""
    yield from t.model.parameters()
    yield from t.model.buffers()
    for state in t.optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))
    for module in t.model.modules():
        for stats in getattr(module, "lime_stats", {}).values():
            yield from (getattr(stats, "_sums", None) or {}).values()


def peak_memory_bytes(t: Trained) -> tuple[int, int]:
    """(peak bytes, resident bytes at step start) of one train step, after the optimizer state exists.

    Peak = the bytes held by this method's state tensors at step start (parameters, buffers, AdamW moments, routing
    statistics) plus the high-water mark of the allocator during the step above its level at step start. CPU: from
    the allocation / free events that ``torch.profiler`` records with ``profile_memory=True`` (exact tensor bytes,
    independent of malloc caching and of the other processes on the machine). CUDA: from
    ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before the step.
    """
    t.model.train()
    device = t.input_ids.device
    resident = _storage_bytes(_state_tensors(t))
    if device.type == "cuda":
        # Every method's model lives on the device at once: count this method's state plus the step's high-water
        # mark above what was allocated before the step (the same definition as on CPU).
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(t)
        sync(device)
        return resident + int(torch.cuda.max_memory_allocated(device)) - before, resident
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(t)
    from torch.autograd import DeviceType

    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    high_water = max(itertools.accumulate(nbytes for _, nbytes in events), default=0)
    return resident + max(high_water, 0), resident


# --- op profiles ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def lime_stage_labels() -> Iterator[None]:
    """Temporarily wrap LiME's routing stages in ``record_function`` so the profile attributes forward time to them."""
    import peft_lime.experts as experts_mod
    import peft_lime.layer as layer_mod
    import peft_lime.routing as routing_mod
    import peft_lime.stats as stats_mod

    patches: list[tuple[Any, str, str]] = [
        (routing_mod, "routing_logits", "lime:routing_logits"),
        (routing_mod, "apply_jitter", "lime:jitter"),
        (routing_mod, "select_experts", "lime:select_experts"),
        (routing_mod, "balance_terms", "lime:balance_terms"),
        (layer_mod, "window_logits", "lime:window_logits"),
        (stats_mod.RoutingStats, "record", "lime:stats_record"),
        (stats_mod.RoutingStats, "_fold", "lime:stats_fold"),
        (experts_mod.LimeExperts, "forward", "lime:experts_mix"),
        (layer_mod, "inject_aux_loss", "lime:inject_aux_loss"),
        (layer_mod.LimeLayer, "forward", "lime:layer_forward"),
    ]
    saved = []
    for owner, attr, label in patches:
        original = getattr(owner, attr, None)
        if original is None:  # a stage renamed or removed in peft_lime: profile without its label
            continue
        saved.append((owner, attr, original))

        def wrapped(*args: Any, __original: Any = original, __label: str = label, **kwargs: Any) -> Any:
            with torch.profiler.record_function(__label):
                return __original(*args, **kwargs)

        setattr(owner, attr, wrapped)
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def profile_ops(fn: Callable[[], Any], repeats: int, labels: bool = False) -> dict[str, dict[str, float]]:
    """Per-op self CPU time (ms per call of ``fn``), total CPU time and call counts, over ``repeats`` calls."""
    from torch.profiler import ProfilerActivity, profile

    ctx = lime_stage_labels() if labels else contextlib.nullcontext()
    with ctx, profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    rows: dict[str, dict[str, float]] = {}
    for avg in prof.key_averages():
        rows[avg.key] = {
            "self_ms": avg.self_cpu_time_total / 1000.0 / repeats,
            "total_ms": avg.cpu_time_total / 1000.0 / repeats,
            "calls": avg.count / repeats,
        }
    return rows
