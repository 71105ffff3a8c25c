"""Per-op profile of ONE wrapped layer: the aten ops LiME adds to a plain LoRA layer, and their CPU time.

    python benchmarks/layer_ops.py --out benchmarks/results/layer_ops_after.json
    PYTHONPATH=<checkout of an older commit> python benchmarks/layer_ops.py --label before --out ...  # same script

Uses the public API only (``get_peft_model`` + ``LimeConfig``), so the same script profiles any version of
peft_lime. One up-projection of SmolLM2-135M's shape (576 -> 1536), LoRA r=8, LiME E=8 (defaults), single thread;
three calls: decoding (1 token, no grad), an eval forward (16 x 80 tokens, no grad) and a training forward +
backward (4 x 128 tokens). For each: aten op calls per layer call and self CPU ms per call, LoRA vs LiME, and the op
table of LiME's extra ops. Compare two JSON files with ``--compare before.json after.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path
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
        out[label] = row
    return out


def summary(result: dict[str, Any]) -> list[str]:
    lines = ["| call | LoRA ops | LiME ops | LoRA self ms | LiME self ms |", "|---|---:|---:|---:|---:|"]
    for label, row in result.items():
        n = {k: sum(v["calls"] for v in row[k].values()) for k in row}
        ms = {k: sum(v["self_ms"] for v in row[k].values()) for k in row}
        lines.append(f"| {label} | {n['lora']:.0f} | {n['lime']:.0f} | {ms['lora']:.3f} | {ms['lime']:.3f} |")
    return lines


def extra_ops(result: dict[str, Any], label: str) -> list[str]:
    row = result[label]
    lines = [f"LiME's extra ops, {label} (calls and self ms per layer call beyond LoRA's):", "",
             "| op | extra calls | extra self ms |", "|---|---:|---:|"]
    for op in sorted(row["lime"], key=lambda k: -row["lime"][k]["self_ms"]):
        lora = row["lora"].get(op, {"calls": 0.0, "self_ms": 0.0})
        extra = row["lime"][op]["calls"] - lora["calls"]
        if extra > 0:
            lines.append(f"| {op} | {extra:.0f} | {row['lime'][op]['self_ms'] - lora['self_ms']:.3f} |")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="after")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        for path in args.compare:
            data = json.loads(path.read_text())
            print(f"\n{data['label']} ({data['peft_lime']}):\n")
            print("\n".join(summary(data["result"]) + [""] + extra_ops(data["result"], "decode (1 token)")))
        return 0
    torch.set_num_threads(1)
    result = measure(args.repeats)
    print("\n".join(summary(result) + [""] + extra_ops(result, "decode (1 token)")))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"label": args.label, "peft_lime": str(Path(peft_lime.__file__).parent), "cpu": platform.processor()}
        args.out.write_text(json.dumps({**meta, "result": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
