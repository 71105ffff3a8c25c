"""Per-op profile of ONE wrapped layer: the aten ops LiME adds to a plain LoRA layer, and their CPU time.

    python benchmarks/layer_ops.py --out benchmarks/results/layer_ops_after.json
    PYTHONPATH=<checkout of an older commit> python benchmarks/layer_ops.py --label before --out ...  # same script

Uses the public API only (``get_peft_model`` + ``LimeConfig``), so the same script profiles any version of
peft_lime. One up-projection of SmolLM2-135M's shape (576 -> 1536), LoRA r=8, LiME E=8 (defaults), single thread;
three calls: decoding (1 token, no grad), an eval forward (16 x 80 tokens, no grad) and a training forward +
backward (4 x 128 tokens). For each: aten op calls per layer call and self CPU ms per call, LoRA vs LiME, and the op
table of LiME's extra ops, and the wall-clock microseconds per layer call (which also count
Python and the native decoding kernel, a ctypes call that the aten table cannot see). The JSON records the label and the git commit of the checkout holding the imported
peft_lime. Compare two JSON files with ``--compare before.json after.json`` (``benchmarks/efficiency.py`` embeds the
same comparison in efficiency.md). Tables: ``lime_examples/bench/layer_ops_tables.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

import peft_lime

CALLS = {"decode (1 token)": (1, 1, False), "eval forward (16x80)": (16, 80, False), "train fwd+bwd (4x128)": (4, 128, True)}


class _OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(576, 1536, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(x)


def _build(lime: bool) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules=["up_proj"], init_lora_weights=False)
    if lime:
        config = peft_lime.LimeConfig(base=config, num_experts=8)
    return get_peft_model(_OneLayer(), config)


def _profile(fn: Callable[[], Any], repeats: int) -> dict[str, dict[str, float]]:
    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    return {
        e.key: {"calls": e.count / repeats, "self_ms": e.self_cpu_time_total / 1000 / repeats}
        for e in prof.key_averages()
        if e.key.startswith("aten::")
    }


def _wall_us(fn: Callable[[], Any], repeats: int) -> float:
    """Wall-clock microseconds per call (best of 5 rounds of ``repeats`` calls): everything a call costs, Python and
    non-aten work (peft_lime's native kernel is one ctypes call, not an aten op) included."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        rounds.append((time.perf_counter() - start) / repeats * 1e6)
    return min(rounds)


def measure(repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, (batch, tokens, train) in CALLS.items():
        x = torch.randn(batch, tokens, 576)
        row = {}
        for name, lime in (("lora", False), ("lime", True)):
            model = _build(lime).train(train)

            def call(model: nn.Module = model, x: torch.Tensor = x, train: bool = train) -> None:
                with torch.set_grad_enabled(train):
                    y = model(x)
                    if train:
                        y.sum().backward()

            row[name] = _profile(call, repeats)
            row[f"{name}_wall_us"] = _wall_us(call, repeats)
        out[label] = row
    return out


def _bench_module(name: str) -> ModuleType:
    """lime_examples/bench/<name>.py of THIS checkout, loaded by path: with PYTHONPATH=<older checkout> (to profile
    that checkout's peft_lime) ``import lime_examples`` may resolve to the older checkout, which may lack it."""
    path = Path(__file__).resolve().parents[1] / "lime_examples" / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_layer_ops_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="after")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    tables, machine = _bench_module("layer_ops_tables"), _bench_module("machine")
    if args.compare:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        lines = tables.compare(before, after)
        for data in (before, after):
            lines += ["", f"{tables.describe(data)}, {data.get('peft_lime', '?')}:", ""]
            lines += tables.extra_ops(data["result"], tables.DECODE)
        print("\n".join(lines))
        return 0
    torch.set_num_threads(1)
    result = measure(args.repeats)
    print("\n".join(tables.summary(result) + [""] + tables.extra_ops(result, tables.DECODE)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        package = Path(peft_lime.__file__).resolve().parent
        meta = {
            "label": args.label,
            "commit": machine.git_commit(package, tracked="__init__.py"),
            "peft_lime": str(package),
            "cpu": machine.cpu_model(),
        }
        args.out.write_text(json.dumps({**meta, "result": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
