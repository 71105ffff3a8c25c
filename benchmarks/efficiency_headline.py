"""Headline efficiency of LiME E=8 against plain PEFT LoRA r=8 at full depth, eager and compiled.

    python benchmarks/efficiency_headline.py                       # SmolLM2-135M shapes, 30 layers, 7 projections
    python benchmarks/efficiency_headline.py --quick --out /tmp/x  # smoke run (2 layers, tiny batches)

Columns (medians of per-repetition ratios to LoRA; every method in one process, measurements interleaved in a
rotating order): train step (forward + backward + AdamW), no-grad eval forward with LiME's routing statistics off
(the default outside training) and on (``set_routing_stats_mode(model, "always")``), greedy decode ms/token with a
dynamic KV cache, peak train-step memory; then the same train step and decode under ``torch.compile`` (inductor;
decoding through transformers' static cache and its own compiled forward), compiled LiME against compiled LoRA.
The MoLoRA-style mixture (8 LoRA experts + router, top-2) is the peer row. Writes efficiency_headline.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import CompileConfig, LlamaForCausalLM

import peft_lime
from lime_examples.bench import harness
from lime_examples.bench.methods import LIME_E8, LORA, MOLORA, all_methods
from lime_examples.bench.param_counts import smollm2_135m_config

RESULTS = Path(__file__).resolve().parent / "results"


def _median_ratio(samples: dict[str, list[float]], name: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[name], samples[LORA]))


def _time(fn: Callable[[], Any], repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _eval_forward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids))

    return run


def _static_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[int], float]:
    config = CompileConfig(backend="inductor")
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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    base = LlamaForCausalLM(smollm2_135m_config(args.layers)).float()
    state = base.state_dict()
    ids = torch.randint(3, 49152, (args.batch, args.seq))
    eval_ids = torch.randint(3, 49152, (args.eval_batch, args.eval_seq))
    prompt = torch.randint(3, 49152, (1, args.prompt))
    methods = {m.name: m for m in all_methods(include_package=False) if m.name in (LORA, LIME_E8, MOLORA)}
    trained: dict[str, harness.Trained] = {}
    params: dict[str, int] = {}
    for name, method in methods.items():
        model = LlamaForCausalLM(smollm2_135m_config(args.layers))
        model.load_state_dict(state)
        model, aux = method.build(model)
        trained[name] = harness.make_trained(model, aux, ids, torch.ones_like(ids))
        params[name] = harness.trainable_parameters(model)
        harness.time_train_steps(trained[name], 1)  # warm-up, optimizer state created
    names = list(trained)
    samples: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names} for k in ("train", "decode", "eval")}
    samples["eval_stats_on"] = {LIME_E8: [], LORA: []}
    for rep in range(0 if args.compiled_only else args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            t = trained[name]
            samples["train"][name].append(statistics.median(harness.time_train_steps(t, args.steps)))
            t.model.eval()
            samples["eval"][name].append(_time(_eval_forward(t.model, eval_ids)))
            one, many = harness.time_decode(t.model, prompt, args.new_tokens)
            samples["decode"][name].append((many - one) / (args.new_tokens - 1))
        lime_model = trained[LIME_E8].model
        with peft_lime.recording_routing_stats(lime_model):
            samples["eval_stats_on"][LIME_E8].append(_time(_eval_forward(lime_model, eval_ids)))
        peft_lime.reset_routing_stats(lime_model)
        samples["eval_stats_on"][LORA].append(samples["eval"][LORA][-1])
    out: dict[str, Any] = {"params": params}
    if not args.compiled_only:
        out["samples"] = samples
        out["peak_bytes"] = {name: harness.peak_memory_bytes(t)[0] for name, t in trained.items()}
    if not args.no_compile:
        out["compiled"] = measure_compiled(args, trained, prompt)
    return out


def measure_compiled(args: argparse.Namespace, trained: dict[str, harness.Trained], prompt: torch.Tensor) -> dict:
    """Compiled train step and compiled static-cache decoding, LoRA vs LiME, interleaved after compilation."""
    # LoRA's and LiME's models run the same forward code: give dynamo room for both models' graphs.
    torch._dynamo.config.recompile_limit = 64
    compiled: dict[str, harness.Trained] = {}
    compile_s: dict[str, float] = {}
    decoders: dict[str, Callable[[int], float]] = {}
    for name in (LORA, LIME_E8):
        t = trained[name]
        run = torch.compile(t.model)
        compiled[name] = harness.Trained(run, t.optimizer, t.aux, t.input_ids, t.attention_mask)
        compile_s[name] = _time(lambda c=compiled[name]: harness.time_train_steps(c, 2))  # compiles, recompiles once
        t.model.eval()
        decoders[name] = _static_decode(t.model, prompt, args.new_tokens)
        # Compiles the decoding step; the static cache sized for the longest run is reused by the shorter one (a
        # smaller cache would be a new shape, i.e. a recompilation inside the timed runs).
        compile_s[name] += decoders[name](args.new_tokens) + decoders[name](1)
    samples: dict[str, dict[str, list[float]]] = {"train": {LORA: [], LIME_E8: []}, "decode": {LORA: [], LIME_E8: []}}
    for rep in range(args.reps):
        for name in ((LORA, LIME_E8) if rep % 2 == 0 else (LIME_E8, LORA)):
            samples["train"][name].append(statistics.median(harness.time_train_steps(compiled[name], args.steps)))
            trained[name].model.eval()
            one, many = decoders[name](1), decoders[name](args.new_tokens)
            samples["decode"][name].append((many - one) / (args.new_tokens - 1))
    return {"samples": samples, "compile_seconds": compile_s}


def table(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = eager_table(result, args) if "samples" in result else []
    if "compiled" in result:
        c = result["compiled"]
        lines += ["", f"torch.compile (inductor), compiled LiME vs compiled LoRA, {args.layers} layers:", "",
                  "| method | train step | decode ms/token (static cache) | compile time |", "|---|---:|---:|---:|"]
        for name in (LORA, LIME_E8):
            cs = c["samples"]
            lines.append(
                f"| {name} | {statistics.median(cs['train'][name]):.3f} s ({_median_ratio(cs['train'], name):.2f}x) | "
                f"{1000 * statistics.median(cs['decode'][name]):.1f} ({_median_ratio(cs['decode'], name):.2f}x) | "
                f"{c['compile_seconds'][name]:.0f} s |"
            )
    return "\n".join(lines)


def eager_table(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    s, p, mem = result["samples"], result["params"], result["peak_bytes"]
    med = lambda k, n: statistics.median(s[k][n])  # noqa: E731
    lines = [
        f"SmolLM2-135M shapes, {args.layers} layers, q/k/v/o/gate/up/down, fp32, train batch {args.batch}x{args.seq}, "
        f"eval forward {args.eval_batch}x{args.eval_seq}, decode {args.new_tokens} tokens after a {args.prompt}-token "
        f"prompt, {args.reps} interleaved repetitions. Ratios: medians of per-repetition ratios to LoRA.",
        "",
        "| method | trainable params | train step | eval forward (stats off) | eval forward (stats on) | "
        "decode ms/token | peak train memory |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in s["train"]:
        on = f"{_median_ratio(s['eval_stats_on'], name):.2f}x" if name in s["eval_stats_on"] else "-"
        lines.append(
            f"| {name} | {p[name]:,} ({p[name] / p[LORA]:.2f}x) | {med('train', name):.3f} s "
            f"({_median_ratio(s['train'], name):.2f}x) | {med('eval', name):.3f} s ({_median_ratio(s['eval'], name):.2f}x)"
            f" | {on} | {1000 * med('decode', name):.1f} ({_median_ratio(s['decode'], name):.2f}x) | "
            f"{mem[name] / 2**20:.0f} MiB ({mem[name] / mem[LORA]:.2f}x) |"
        )
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, tiny batches, 2 repetitions")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-seq", type=int, default=80)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--compiled-only", action="store_true", help="only the torch.compile columns")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.seq, args.eval_batch, args.eval_seq = 2, 2, 16, 2, 16
        args.prompt, args.new_tokens, args.reps, args.steps = 8, 4, 2, 1
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    started = time.time()
    result = measure(args)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "python": platform.python_version()}
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["wall_seconds"] = time.time() - started
    text = table(result, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "efficiency_headline_compiled" if args.compiled_only else "efficiency_headline"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    command = "python benchmarks/efficiency_headline.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / f"{stem}.md").write_text(
        f"# Efficiency headline\n\nCommand: `{command.strip()}`\n\nMachine: {result['machine']}, "
        f"wall time {result['wall_seconds'] / 60:.1f} min.\n\n{text}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
