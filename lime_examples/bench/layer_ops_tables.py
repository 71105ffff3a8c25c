"""Markdown tables of ``benchmarks/layer_ops.py`` results (aten ops of ONE wrapped layer, LoRA vs LiME).

A result maps a call label ("decode (1 token)", ...) to {"lora": ops, "lime": ops}, ops mapping an aten op name to
{"calls": per layer call, "self_ms": per layer call}. A layer_ops JSON file holds {"label", "commit", "peft_lime",
"cpu", "result"}. No relative imports: ``benchmarks/layer_ops.py`` loads this file by path (see there).
"""

from __future__ import annotations

from typing import Any

DECODE = "decode (1 token)"


def totals(row: dict[str, dict[str, dict[str, float]]], method: str) -> tuple[float, float]:
    """(aten op calls, self CPU ms) per layer call of ``method`` ("lora" or "lime") in one call row."""
    ops = row.get(method, {})
    return sum(v["calls"] for v in ops.values()), sum(v["self_ms"] for v in ops.values())


def wall(row: dict[str, Any], method: str) -> str:
    """Wall-clock microseconds per layer call of ``method``, or '-' (files written before it was measured)."""
    value = row.get(f"{method}_wall_us")
    return "-" if value is None else f"{value:.0f}"


def summary(result: dict[str, Any]) -> list[str]:
    """One run: op calls, self ms and wall microseconds per layer call, LoRA vs LiME."""
    lines = ["| call | LoRA ops | LiME ops | LoRA self ms | LiME self ms | LoRA wall us | LiME wall us |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, row in result.items():
        (n_lora, ms_lora), (n_lime, ms_lime) = totals(row, "lora"), totals(row, "lime")
        lines.append(f"| {label} | {n_lora:.0f} | {n_lime:.0f} | {ms_lora:.3f} | {ms_lime:.3f} | {wall(row, 'lora')} "
                     f"| {wall(row, 'lime')} |")
    return lines


def describe(data: dict[str, Any]) -> str:
    """'label (commit X)' of a layer_ops JSON file."""
    return f"{data.get('label', '?')} (commit {data.get('commit', 'unknown')})"


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Two runs (whole JSON files): LoRA (from 'after') next to LiME before and after, ops and self ms per call."""
    lines = [
        f"Before: {describe(before)}; after: {describe(after)}. Per layer call: aten op calls, self CPU ms of those ops, "
        "and wall-clock microseconds (everything: Python, and the native decoding kernel, which is one ctypes call and "
        "no aten op; '-': not measured by that version of the script).",
        "",
        "| call | LoRA ops | LiME ops before | LiME ops after | LoRA self ms | LiME self ms before "
        "| LiME self ms after | LoRA wall us | LiME wall us before | LiME wall us after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in after["result"].items():
        n_lora, ms_lora = totals(row, "lora")
        n_after, ms_after = totals(row, "lime")
        old = before["result"].get(label)
        n_before, ms_before, us_before = "-", "-", "-"
        if old:
            n, ms = totals(old, "lime")
            n_before, ms_before, us_before = f"{n:.0f}", f"{ms:.3f}", wall(old, "lime")
        lines.append(
            f"| {label} | {n_lora:.0f} | {n_before} | {n_after:.0f} | {ms_lora:.3f} | {ms_before} | {ms_after:.3f} "
            f"| {wall(row, 'lora')} | {us_before} | {wall(row, 'lime')} |"
        )
    return lines


def extra_ops(result: dict[str, Any], label: str = DECODE) -> list[str]:
    """The ops LiME runs beyond LoRA's in one call: extra calls and extra self ms per layer call."""
    row = result[label]
    lines = [
        f"LiME's extra ops, {label} (calls and self ms per layer call beyond LoRA's):",
        "",
        "| op | extra calls | extra self ms |",
        "|---|---:|---:|",
    ]
    for op in sorted(row["lime"], key=lambda k: -row["lime"][k]["self_ms"]):
        lora = row["lora"].get(op, {"calls": 0.0, "self_ms": 0.0})
        extra = row["lime"][op]["calls"] - lora["calls"]
        if extra > 0:
            lines.append(f"| {op} | {extra:.0f} | {row['lime'][op]['self_ms'] - lora['self_ms']:.3f} |")
    return lines
