"""The variants comparison of ``benchmarks/efficiency.py --variants``: LiME E=4/8/16, fixed top-2, hard selection,
n-gram 4, MixLoRA (re-implementation, and the pip package when usable) and the MoLoRA-style mixture against plain
PEFT LoRA, at 8 of SmolLM2-135M's 30 layers on CPU (plus a 1B-class Llama in bf16 with ``--device cuda``).

Per method, at the same targets (q/k/v/o/gate/up/down) and rank (8): trainable parameters (measured, and asserted
equal to the method's formula), median train step time (forward + backward + AdamW step), peak memory of a train
step, and per-token decode latency with KV cache (greedy). Every method lives in the same process; measurements are
interleaved (all methods once per repetition, in a rotating order) and reported as medians of per-repetition
ratios to plain PEFT LoRA. The full CPU run adds torch.profiler op tables (profile.md). Reports: ``report``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import harness, report
from .baselines.mixlora_pkg import check_parity, package_status
from .machine import machine_info
from .methods import LIME_E8, LORA, Method, all_methods
from .param_counts import llama_1b_config, smollm2_135m_config

LOGGER = logging.getLogger("benchmarks.efficiency.variants")


@dataclass
class Setup:
    """One model / workload on which every method is measured."""

    label: str
    config: Any
    dtype: torch.dtype
    full_layers: int
    batch: int
    seq: int
    reps: int
    steps: int
    warmup: int
    prompt_len: int
    new_tokens: int


def make_setups(args: argparse.Namespace) -> list[Setup]:
    """The CPU setup (SmolLM2-135M shapes, fewer layers), plus a 1B-class bf16 Llama on CUDA."""
    quick, cuda = args.quick, args.device == "cuda"
    if quick:
        layers, batch, seq, reps, steps, prompt, new = 2, 2, 32, 2, 2, 16, 8
    elif cuda:
        layers, batch, seq, reps, steps, prompt, new = 30, 8, 512, 10, 5, 32, 32
    else:
        layers, batch, seq, reps, steps, prompt, new = 8, 4, 128, 7, 3, 32, 32
    layers = args.layers or layers
    batch, seq, reps = args.batch or batch, args.seq or seq, args.reps or reps
    setups = [
        Setup("SmolLM2-135M", smollm2_135m_config(layers), torch.float32, 30, batch, seq, reps, steps, 1, prompt, new)
    ]
    if cuda and not args.smollm_only:
        big_layers = 2 if quick else 16
        big_batch, big_seq = (2, 64) if quick else (4, 512)
        setups.append(
            Setup(
                "Llama-1B-class",
                llama_1b_config(big_layers),
                torch.bfloat16,
                16,
                big_batch,
                big_seq,
                reps,
                steps,
                1,
                prompt,
                new,
            )
        )
    return setups


def build_all(setup: Setup, methods: list[Method], device: torch.device) -> dict[str, harness.Trained]:
    """One random-init base model, deep-copied and adapted by every method; parameter counts checked."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(setup.config).to(setup.dtype)
    base.generation_config.pad_token_id = 0
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, setup.config.vocab_size, (setup.batch, setup.seq), generator=generator).to(device)
    mask = torch.ones_like(ids)
    built: dict[str, harness.Trained] = {}
    for method in tqdm(methods, desc=f"build {setup.label}", leave=False):
        torch.manual_seed(1)
        model, aux = method.build(copy.deepcopy(base))
        measured = harness.trainable_parameters(model)
        expected = method.expected_params(setup.config)
        if measured != expected:
            raise AssertionError(f"{method.name}: {measured} trainable parameters measured, formula gives {expected}")
        built[method.name] = harness.make_trained(model, aux, ids, mask)
        LOGGER.info("%s: %d trainable parameters (= formula)", method.name, measured)
    del base
    return built


def measure(setup: Setup, methods: list[Method], device: torch.device, profile: bool) -> dict[str, Any]:
    """Interleaved repetitions of train steps and decoding, one peak-memory step per method, optional profile."""
    built = build_all(setup, methods, device)
    names = [m.name for m in methods]
    prompt_gen = torch.Generator().manual_seed(4321)
    prompt = torch.randint(3, setup.config.vocab_size, (1, setup.prompt_len), generator=prompt_gen).to(device)
    raw: dict[str, dict[str, Any]] = {
        n: {"params": harness.trainable_parameters(built[n].model), "step_s": [], "decode_1_s": [], "decode_n_s": []}
        for n in names
    }
    for name in tqdm(names, desc="warm-up", leave=False):
        harness.time_train_steps(built[name], setup.warmup)
        harness.time_decode(built[name].model, prompt, 2)
    for rep in tqdm(range(setup.reps), desc=f"{setup.label} repetitions"):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            raw[name]["step_s"].append(harness.time_train_steps(built[name], setup.steps))
            t1, tn = harness.time_decode(built[name].model, prompt, setup.new_tokens)
            raw[name]["decode_1_s"].append(t1)
            raw[name]["decode_n_s"].append(tn)
    for name in tqdm(names, desc="peak memory", leave=False):
        peak, resident = harness.peak_memory_bytes(built[name])
        raw[name]["peak_bytes"], raw[name]["resident_bytes"] = peak, resident
    profiles = None
    if profile and LORA in built and LIME_E8 in built:
        from lime_examples.bench.profile import profile_pair

        profiles = profile_pair(built[LORA], built[LIME_E8], prompt)
    del built
    return {"raw": raw, "profile": profiles}


def summarize(setup: Setup, raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Medians and per-repetition ratios to LoRA."""
    med = statistics.median

    def per_rep_step(name: str) -> list[float]:
        return [med(samples) for samples in raw[name]["step_s"]]

    def per_rep_decode(name: str) -> list[float]:
        n = setup.new_tokens
        return [(tn - t1) / (n - 1) for t1, tn in zip(raw[name]["decode_1_s"], raw[name]["decode_n_s"])]

    ref_step, ref_decode = per_rep_step(LORA), per_rep_decode(LORA)
    ref = raw[LORA]
    out: dict[str, dict[str, float]] = {}
    for name, r in raw.items():
        steps, decode = per_rep_step(name), per_rep_decode(name)
        step_ratios = [a / b for a, b in zip(steps, ref_step)]
        out[name] = {
            "params": r["params"],
            "params_ratio": r["params"] / ref["params"],
            "step_ms": 1000 * med([s for rep in r["step_s"] for s in rep]),
            "step_ratio": med(step_ratios),
            "step_ratio_min": min(step_ratios),
            "step_ratio_max": max(step_ratios),
            "decode_ms": 1000 * med(decode),
            "decode_ratio": med([a / b for a, b in zip(decode, ref_decode)]),
            "peak_mib": r["peak_bytes"] / 2**20,
            "mem_ratio": r["peak_bytes"] / ref["peak_bytes"],
            "per_rep_step_s": steps,
        }
    return out


def run(args: argparse.Namespace, device: torch.device, command: str, checkout: Path) -> dict[str, Any]:
    """Every setup of the variants comparison (the pip MixLoRA row and its parity check when usable); the results
    dict that ``report.write_all`` writes."""
    usable, reason = package_status()
    package_note = {"usable": usable, "status": reason, "parity_max_abs_diff": None}
    if usable:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        tiny = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=128,
                num_hidden_layers=2,
            )
        )
        package_note["parity_max_abs_diff"] = check_parity(tiny)
        LOGGER.info(
            "MixLoRA re-implementation vs package: max |logits diff| = %g", package_note["parity_max_abs_diff"]
        )
    methods = all_methods(include_package=usable and not args.no_package)
    if args.methods:
        methods = [m for m in methods if m.name == LORA or m.name in args.methods]

    results: dict[str, Any] = {
        "machine": machine_info(str(device), checkout),
        "command": command,
        "package": package_note,
        "setups": [],
    }
    setups = make_setups(args)
    for setup in setups:
        setup_methods = methods
        if setup.dtype != torch.float32:  # the package's expert path only runs in fp32
            setup_methods = [m for m in methods if "pip" not in m.name]
        LOGGER.info(
            "%s: %d methods, %d layers, batch %dx%d",
            setup.label,
            len(setup_methods),
            setup.config.num_hidden_layers,
            setup.batch,
            setup.seq,
        )
        want_profile = device.type == "cpu" and not args.quick and not args.no_profile and setup is setups[0]
        measured = measure(setup, setup_methods, device, want_profile)
        results["setups"].append(
            {
                "setup": report.setup_dict(setup),
                "methods": {m.name: m.description for m in setup_methods},
                "raw": measured["raw"],
                "summary": summarize(setup, measured["raw"]),
                "profile": measured["profile"],
            }
        )
    return results
