"""Efficiency of LiME against plain LoRA, MixLoRA and a MoLoRA-style mixture, on SmolLM2-135M's architecture.

    python benchmarks/efficiency.py            # full CPU run (< 20 min on 2 cores), results in benchmarks/results/
    python benchmarks/efficiency.py --quick    # CI smoke run (< 2 min), results in benchmarks/results/quick/
    python benchmarks/efficiency.py --device cuda   # adds a 1B-class Llama in bf16

Per method, at the same targets (q/k/v/o/gate/up/down) and rank (8): trainable parameters (measured, and asserted
equal to the method's formula), median train step time (forward + backward + AdamW step), peak memory of a train
step, and per-token decode latency with KV cache (greedy). Every method lives in the same process; measurements are
interleaved (all methods once per repetition, in a rotating order) and reported as medians of per-repetition
ratios to plain PEFT LoRA. Writes efficiency.md (also printed), efficiency.json (raw samples), efficiency.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from lime_examples.bench import harness, report
from lime_examples.bench.baselines.mixlora_pkg import check_parity, package_status
from lime_examples.bench.methods import LIME_E8, LORA, Method, all_methods
from lime_examples.bench.param_counts import llama_1b_config, smollm2_135m_config

LOGGER = logging.getLogger("benchmarks.efficiency")
RESULTS = Path(__file__).resolve().parent / "results"


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


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, thread count, library versions (and GPU name on CUDA)."""
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (every workload size can be overridden)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: 2 layers, 2x32 batch, 2 repetitions")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/ or results/quick/)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the SmolLM2 model")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    p.add_argument("--methods", nargs="*", default=None, help="subset of method names (LoRA is always included)")
    p.add_argument("--no-package", action="store_true", help="skip the pip mixlora row even if installed")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler comparison (full CPU run)")
    p.add_argument("--smollm-only", action="store_true", help="on CUDA, skip the 1B-class model")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--from-json", type=Path, default=None, help="only rewrite the report (md, png) from an efficiency.json"
    )
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run every setup, write efficiency.{md,json,png}, print the markdown."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        markdown = report.write_all(results, out_dir, quick="--quick" in results["command"].split())
        print(markdown)
        return 0

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

    command = " ".join(["python benchmarks/efficiency.py", *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, Any] = {
        "machine": machine_info(device),
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
    markdown = report.write_all(results, out_dir, quick=args.quick)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
