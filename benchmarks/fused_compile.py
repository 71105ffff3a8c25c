"""Compile cost of the fused routing region (peft_lime/fused_route.py, ``PEFT_LIME_FUSED=1``) at full depth.

    python benchmarks/fused_compile.py            # results/fused_compile.{md,json}
    python benchmarks/fused_compile.py --layers 2 --out /tmp/x   # smoke run

SmolLM2-135M shapes at --layers layers, LiME E=8 over LoRA r=8 on all seven projections, fp32, inductor's caches
off (cold compiles). Phases, each called twice with the same shapes and then with new ones: train steps (4x128, then
2x96), eval forwards (16x80, then 8x40), greedy decoding (32-token prompt, 8 new tokens). Compile cost of a phase =
its first call minus its second (same shapes); "new shapes" = the first call at new shapes minus a repeat of it. The
graphs the region built (dynamo's unique graphs) are counted after every phase: a recompile shows as a graph more.
With the native decoding kernel on (the default), eval and decoding calls take the kernel, so the region compiles
for training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # cold compiles, before torch is imported

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from lime_examples.bench import harness  # noqa: E402
from lime_examples.bench.headline import _random_ids  # noqa: E402
from lime_examples.bench.machine import machine_info  # noqa: E402
from lime_examples.bench.methods import fused_method  # noqa: E402
from lime_examples.bench.param_counts import smollm2_135m_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def measure(layers: int) -> dict[str, Any]:
    """Seconds of each call and the region's graph count after it."""
    from transformers import LlamaForCausalLM

    config = smollm2_135m_config(layers)
    torch.manual_seed(0)
    model, aux = fused_method().build(LlamaForCausalLM(config).float())
    ids = {shape: _random_ids(shape, 7, config.vocab_size) for shape in ((4, 128), (2, 96), (16, 80), (8, 40), (1, 32))}

    def train(shape: tuple[int, int]) -> Callable[[], Any]:
        t = harness.make_trained(model, aux, ids[shape], torch.ones_like(ids[shape]))
        return lambda: harness.time_train_steps(t, 1)

    def evaluate(shape: tuple[int, int]) -> Callable[[], Any]:
        def run() -> Any:
            model.eval()
            with torch.no_grad():
                return model(input_ids=ids[shape], attention_mask=torch.ones_like(ids[shape]))

        return run

    calls = [
        ("train 4x128, first", train((4, 128))), ("train 4x128, again", train((4, 128))),
        ("train 2x96 (new shapes), first", train((2, 96))), ("train 2x96, again", train((2, 96))),
        ("eval 16x80, first", evaluate((16, 80))), ("eval 16x80, again", evaluate((16, 80))),
        ("eval 8x40 (new shapes), first", evaluate((8, 40))), ("eval 8x40, again", evaluate((8, 40))),
        ("decode 8 tokens, first", lambda: harness.generate(model.eval(), ids[(1, 32)], 8)),
        ("decode 8 tokens, again", lambda: harness.generate(model.eval(), ids[(1, 32)], 8)),
    ]
    rows = []
    for label, fn in calls:
        seconds = _seconds(fn)
        rows.append({"call": label, "seconds": seconds, "graphs": _graphs()})
    return {"rows": rows, "compile_seconds": sum(r["seconds"] for r in rows[0::2]) - sum(r["seconds"] for r in rows[1::2])}


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Compile cost of the fused routing region (`PEFT_LIME_FUSED=1`)", "",
        f"Command: `{result['command']}`. Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; "
        f"torch {m['torch']}; commit {m.get('commit', 'unknown')}; {m['date']}. {result['layers']} layers.", "",
        __doc__.split("\n\n", 2)[2].strip(), "",
        "| call | seconds | graphs built so far |", "|---|---:|---:|",
    ]
    lines += [f"| {r['call']} | {r['seconds']:.2f} | {r['graphs']} |" for r in result["rows"]]
    lines += ["", f"Compile cost (first calls minus repeats, all phases): {result['compile_seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": " ".join(["python", "benchmarks/fused_compile.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine_info("cpu", ROOT), "layers": args.layers, **measure(args.layers)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fused_compile.json").write_text(json.dumps(result, indent=1))
    markdown = to_markdown(result)
    (args.out / "fused_compile.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
