"""Headline efficiency measurements: LiME E=8 against PEFT LoRA r=8 (and the MoE peers) at full depth, eager and
compiled. Used by ``benchmarks/efficiency.py``; the tables are built by ``headline_report``.

Eager: SmolLM2-135M shapes, q/k/v/o/gate/up/down, fp32, every method built on identical base weights and kept alive
in one process; per repetition every method is measured once, in a rotating order: train step (forward + backward
+ AdamW, median of ``steps`` timed steps), no-grad eval forward with LiME's routing statistics off (the default
outside training) and, for LiME, on (``peft_lime.recording_routing_stats``), greedy decoding with a dynamic KV
cache; then one peak-memory train step per method. Compiled: ``torch.compile`` of LoRA and LiME at another depth,
train step and static-cache decoding through transformers' ``CompileConfig``, alternating order per repetition.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch._inductor.config

from . import harness
from .methods import (
    LIME_E8,
    LIME_E8_EAGER,
    LIME_E8_FUSED,
    LORA,
    MIXLORA,
    MOLORA,
    all_methods,
    eager_method,
    fused_method,
)
from .param_counts import smollm2_135m_config

HEADLINE_METHODS = (LORA, LIME_E8, MOLORA, MIXLORA)
COMPILED_METHODS = (LORA, LIME_E8)
# --fused: LiME (native decoding kernel on, the default), with the kernel off, and with the compiled routing region,
# against LoRA (issue 25).
FUSED_METHODS = (LORA, LIME_E8, LIME_E8_EAGER, LIME_E8_FUSED)


@dataclass
class Workload:
    """Sizes of one headline run (defaults: the full run; ``quick()``: the smoke run)."""

    layers: int = 30
    batch: int = 4
    seq: int = 128
    eval_batch: int = 16
    eval_seq: int = 80
    prompt: int = 32
    new_tokens: int = 32
    reps: int = 5
    steps: int = 2
    compiled_layers: int = 8
    compile_backend: str = "inductor"

    @classmethod
    def quick(cls) -> Workload:
        return cls(layers=2, batch=2, seq=16, eval_batch=2, eval_seq=16, prompt=8, new_tokens=4, reps=2, steps=1,
                   compiled_layers=2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _eval_forward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids))

    return run


def _random_ids(shape: tuple[int, int], seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def build(names: tuple[str, ...], layers: int, batch: int, seq: int) -> tuple[dict[str, harness.Trained], dict]:
    """Every method on the same random-init base weights (seeded construction, no copy kept alive), its trainable
    parameters checked against its formula, one warm-up train step (creates the AdamW state)."""
    from transformers import LlamaForCausalLM

    config = smollm2_135m_config(layers)
    methods = {m.name: m for m in [*all_methods(include_package=False), fused_method(), eager_method()]}
    ids = _random_ids((batch, seq), 1234, config.vocab_size)
    built: dict[str, harness.Trained] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in names:
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).float()
        torch.manual_seed(1)
        model, aux = methods[name].build(base)
        params, expected = harness.trainable_parameters(model), methods[name].expected_params(config)
        if params != expected:
            raise AssertionError(f"{name}: {params} trainable parameters measured, formula gives {expected}")
        built[name] = harness.make_trained(model, aux, ids, torch.ones_like(ids))
        harness.time_train_steps(built[name], 1)
        info[name] = {"params": params, "description": methods[name].description}
    return built, info


def _rotation(names: list[str], rep: int) -> list[str]:
    k = rep % len(names)
    return names[k:] + names[:k]


def measure_eager(w: Workload, names: tuple[str, ...] = HEADLINE_METHODS) -> dict[str, Any]:
    """Interleaved eager measurements (raw per-repetition samples), parameters and peak train-step bytes."""
    import peft_lime

    built, info = build(names, w.layers, w.batch, w.seq)
    vocab = smollm2_135m_config(1).vocab_size
    eval_ids, prompt = _random_ids((w.eval_batch, w.eval_seq), 99, vocab), _random_ids((1, w.prompt), 4321, vocab)
    for t in built.values():  # warm-up of the eval forward and of generate
        t.model.eval()
        _eval_forward(t.model, eval_ids)()
        harness.time_decode(t.model, prompt, 2)
    samples: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names} for k in ("train", "eval", "decode")}
    samples["eval_stats_on"] = {LIME_E8: []} if LIME_E8 in names else {}
    for rep in range(w.reps):
        for name in _rotation(list(names), rep):
            t = built[name]
            samples["train"][name].append(statistics.median(harness.time_train_steps(t, w.steps)))
            t.model.eval()
            samples["eval"][name].append(_time(_eval_forward(t.model, eval_ids)))
            if name in samples["eval_stats_on"]:
                # Fold and drop what the train steps recorded first: only this forward's recording is timed.
                peft_lime.reset_routing_stats(t.model)
                with peft_lime.recording_routing_stats(t.model):
                    samples["eval_stats_on"][name].append(_time(_eval_forward(t.model, eval_ids)))
                peft_lime.reset_routing_stats(t.model)
            one, many = harness.time_decode(t.model, prompt, w.new_tokens)
            samples["decode"][name].append((many - one) / (w.new_tokens - 1))
    peak = {name: harness.peak_memory_bytes(t)[0] for name, t in built.items()}
    return {
        "params": {n: info[n]["params"] for n in names},
        "methods": {n: info[n]["description"] for n in names},
        "peak_bytes": peak,
        "samples": samples,
    }


def _static_decode(model: torch.nn.Module, prompt: torch.Tensor, backend: str) -> Callable[[int], float]:
    from transformers import CompileConfig

    config = CompileConfig(backend=backend)
    config._compile_all_devices = True  # transformers compiles its decoding step on accelerators only by default

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                eos_token_id=2, cache_implementation="static", compile_config=config,
            )
        return time.perf_counter() - start

    return run


def measure_compiled(w: Workload, names: tuple[str, ...] = COMPILED_METHODS) -> dict[str, Any]:
    """torch.compile'd train step and compiled static-cache decoding at ``w.compiled_layers`` layers (a model build
    of its own), interleaved after compilation; compile seconds = first two compiled steps + first two decodes."""
    # LoRA's and LiME's models run the same forward code: give dynamo room for both models' graphs.
    torch._dynamo.config.recompile_limit = 64
    # Cold compile times: inductor's on-disk caches would otherwise make a rerun's compile look almost free.
    torch._inductor.config.force_disable_caches = True
    built, _ = build(names, w.compiled_layers, w.batch, w.seq)
    prompt = _random_ids((1, w.prompt), 4321, smollm2_135m_config(1).vocab_size)
    compiled: dict[str, harness.Trained] = {}
    compile_s: dict[str, float] = {}
    decoders: dict[str, Callable[[int], float]] = {}
    for name in names:
        t = built[name]
        run = torch.compile(t.model, backend=w.compile_backend)
        compiled[name] = harness.Trained(run, t.optimizer, t.aux, t.input_ids, t.attention_mask)
        compile_s[name] = _time(lambda c=compiled[name]: harness.time_train_steps(c, 2))  # compiles, recompiles once
        t.model.eval()
        decoders[name] = _static_decode(t.model, prompt, w.compile_backend)
        # Compiles the decoding step; the static cache sized for the longest run is reused by the shorter one (a
        # smaller cache would be a new shape, i.e. a recompilation inside the timed runs).
        compile_s[name] += decoders[name](w.new_tokens) + decoders[name](1)
    samples: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names} for k in ("train", "decode")}
    for rep in range(-1, w.reps):  # rep -1: one untimed round, so that switching models recompiles nothing timed
        for name in _rotation(list(names), max(rep, 0)):
            train = statistics.median(harness.time_train_steps(compiled[name], w.steps))
            built[name].model.eval()
            one, many = decoders[name](1), decoders[name](w.new_tokens)
            if rep >= 0:
                samples["train"][name].append(train)
                samples["decode"][name].append((many - one) / (w.new_tokens - 1))
    return {"layers": w.compiled_layers, "backend": w.compile_backend, "samples": samples,
            "compile_seconds": compile_s}
