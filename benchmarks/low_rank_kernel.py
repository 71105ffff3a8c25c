"""The native low-rank modulation (csrc/lime_low_rank.c) per build shape, against LoRA's own up-projection.

    python benchmarks/low_rank_kernel.py        # writes benchmarks/results/low_rank_kernel.{json,md}
    python benchmarks/low_rank_kernel.py --quick --out /tmp/x   # smoke run: one odd width, one repetition

One call of y = out + s (a @ B.T) * (mix @ P) and its backward (the gradients of a, mix, B and P), N = 512 tokens
(the 4 x 128 train batch), r = E = 8, at the three output widths of SmolLM2-135M's projections (192: k / v, 576:
q / o / down, 1536: gate / up), one thread, float32. Each row is a build of the library with the vector width and
token tile named (``-DLANES=.. -DTILE_TOKENS=..``; "ISA default" is the shape the source picks for this CPU, what
peft_lime uses). The reference is what plain LoRA does on the same path: its up-projection ``addmm(out, a, B.T, s)``
forward and the two matmuls of its backward (grad of B, grad of a). Every build's outputs are checked against torch
at 1e-4 (relative) before it is timed. Median of 7 repetitions of 20 calls. Time it on an idle machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lime_examples.bench.machine import machine_info  # noqa: E402
from peft_lime import native_build, native_route  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (192, 576, 1536)
N_TOKENS, RANK, EXPERTS, SCALE = 512, 8, 8, 0.5
# (label, extra compiler flags): the ISA default and explicit shapes (16 x 4 was the only shape before commit d833258).
BUILDS = (("ISA default", ()), ("16 lanes x 4 tokens", ("-DLANES=16", "-DTILE_TOKENS=4")),
          ("8 lanes x 4 tokens", ("-DLANES=8", "-DTILE_TOKENS=4")), ("4 lanes x 6 tokens", ("-DLANES=4", "-DTILE_TOKENS=6")))


def _entries(flags: tuple[str, ...]) -> tuple[Any, Any]:
    """lime_low_rank_modulate / lime_low_rank_backward of the library built with the host flags plus ``flags``."""
    path = native_build.compile_library(native_build.compiler_command(), native_build.FLAG_SETS[0] + flags)
    library = ctypes.CDLL(str(path))
    entries = []
    for name in ("lime_low_rank_modulate", "lime_low_rank_backward"):
        entry = getattr(library, name)
        entry.argtypes, entry.restype = native_route._SIGNATURES[name], ctypes.c_int
        entries.append(entry)
    return entries[0], entries[1]


REPEATS = {"calls": 20, "reps": 7}


def _median_ms(fn: Callable[[], Any]) -> float:
    fn()
    calls, reps = REPEATS["calls"], REPEATS["reps"]
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def _operands(d: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(d)
    mix = torch.softmax(torch.randn(N_TOKENS, EXPERTS, generator=gen), -1)
    a, BT = torch.randn(N_TOKENS, RANK, generator=gen), torch.randn(RANK, d, generator=gen)
    P, out, g = torch.randn(EXPERTS, d, generator=gen), torch.randn(N_TOKENS, d, generator=gen), torch.randn(
        N_TOKENS, d, generator=gen)
    return {"a": a, "mix": mix, "BT": BT, "P": P, "out": out, "g": g}


def _measure_build(flags: tuple[str, ...], d: int) -> dict[str, float]:
    forward, backward = _entries(flags)
    t = _operands(d)
    y = torch.empty_like(t["out"])
    grads = [torch.empty(N_TOKENS, RANK), torch.empty(N_TOKENS, EXPERTS), torch.empty(RANK, d), torch.empty(EXPERTS, d)]
    ptr = {k: v.data_ptr() for k, v in t.items()}

    def fwd() -> int:
        return forward(ptr["a"], ptr["mix"], ptr["BT"], ptr["P"], ptr["out"], y.data_ptr(), N_TOKENS, RANK, EXPERTS, d,
                       SCALE, 1)

    def bwd() -> int:
        return backward(ptr["a"], ptr["mix"], ptr["BT"], ptr["P"], ptr["g"], *(x.data_ptr() for x in grads), N_TOKENS,
                        RANK, EXPERTS, d, SCALE, 1)

    assert fwd() == 0 and bwd() == 0
    row, mod = t["a"] @ t["BT"], t["mix"] @ t["P"]
    gd, gr = SCALE * t["g"] * mod, SCALE * t["g"] * row
    want = [gd @ t["BT"].t(), gr @ t["P"].t(), t["a"].t() @ gd, t["mix"].t() @ gr]
    torch.testing.assert_close(y, t["out"] + SCALE * row * mod, rtol=1e-4, atol=1e-4)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    return {"forward_ms": _median_ms(fwd), "backward_ms": _median_ms(bwd)}


def _measure_lora(d: int) -> dict[str, float]:
    t = _operands(d)
    B = t["BT"].t()
    return {"forward_ms": _median_ms(lambda: torch.addmm(t["out"], t["a"], t["BT"], alpha=SCALE)),
            "backward_ms": _median_ms(lambda: (t["g"].t() @ t["a"], t["g"] @ B))}


def render(result: dict[str, Any]) -> str:
    """The markdown table of one run's JSON."""
    m = result["machine"]
    lines = ["# LiME's native low-rank modulation per build shape (benchmarks/low_rank_kernel.py)", "",
             f"- CPU: {m.get('cpu')}; torch {m.get('torch')}; commit {m.get('commit')}; date {m.get('date')}",
             f"- command: `{result['command']}`", "",
             f"One call, N = {N_TOKENS} tokens, r = E = {RANK}, one thread, float32; median ms of 7 x 20 calls. "
             "LoRA: its up-projection addmm forward and the two matmuls of its backward (the same path of plain LoRA).",
             "", "| build | d | forward ms | backward ms | forward / LoRA | backward / LoRA |", "|---|---:|---:|---:|---:|---:|"]
    for d in result["widths"]:
        lora = result["lora"][str(d)]
        lines.append(f"| LoRA (torch) | {d} | {lora['forward_ms']:.3f} | {lora['backward_ms']:.3f} | 1.00x | 1.00x |")
        for label, _ in BUILDS:
            row = result["builds"][label][str(d)]
            lines.append(f"| {label} | {d} | {row['forward_ms']:.3f} | {row['backward_ms']:.3f} | "
                         f"{row['forward_ms'] / lora['forward_ms']:.2f}x | {row['backward_ms'] / lora['backward_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (low_rank_kernel.json / .md)")
    p.add_argument("--quick", action="store_true", help="smoke run: one width with tails (33), one call")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    widths = (33,) if args.quick else WIDTHS
    REPEATS.update(calls=1, reps=1) if args.quick else REPEATS.update(calls=20, reps=7)
    result: dict[str, Any] = {"command": "python benchmarks/low_rank_kernel.py" + "".join(f" {a}" for a in argv or []),
                              "machine": machine_info("cpu", Path(__file__).resolve().parents[1]), "widths": widths,
                              "lora": {}, "builds": {label: {} for label, _ in BUILDS}}
    for d in widths:
        result["lora"][str(d)] = _measure_lora(d)
        for label, flags in BUILDS:
            result["builds"][label][str(d)] = _measure_build(flags, d)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "low_rank_kernel.json").write_text(json.dumps(result, indent=1))
    (args.out / "low_rank_kernel.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
