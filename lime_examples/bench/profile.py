"""Where LiME's overhead over plain LoRA goes: torch.profiler op tables for one train step and for decoding.

Used by ``benchmarks/efficiency.py --variants`` (full CPU run, results/profile.md) and ``benchmarks/profile_lime.py``.
LiME's routing stages (routing_logits, select_experts, balance/statistics, expert mix, aux injection) are wrapped in
``record_function`` labels during the profile only (monkeypatched, peft_lime is not modified), so their forward
time, children included, is reported next to the per-op self times.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import harness

TOP = 10


def profile_pair(
    lora: harness.Trained, lime: harness.Trained, prompt: torch.Tensor, steps: int = 3, decode_tokens: int = 16
) -> dict[str, Any]:
    """Op profiles (ms per train step / per generate call) of LoRA and LiME, train and decode."""
    out: dict[str, Any] = {"steps": steps, "decode_tokens": decode_tokens, "train": {}, "decode": {}}
    for label, t in (("LoRA", lora), ("LiME", lime)):
        is_lime = label == "LiME"
        t.model.train()
        harness.train_step(t)  # warm
        out["train"][label] = harness.profile_ops(lambda t=t: harness.train_step(t), steps, labels=is_lime)
        t.model.eval()
        with torch.no_grad():
            harness.generate(t.model, prompt, decode_tokens)  # warm
            out["decode"][label] = harness.profile_ops(
                lambda t=t: harness.generate(t.model, prompt, decode_tokens), 2, labels=is_lime
            )
    return out


def _is_op(name: str) -> bool:
    return not name.startswith("lime:") and not name.startswith("ProfilerStep")


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def _tables(kind: str, lora: dict[str, dict[str, float]], lime: dict[str, dict[str, float]], unit: str) -> list[str]:
    lines: list[str] = []
    total_lora = sum(r["self_ms"] for n, r in lora.items() if _is_op(n))
    total_lime = sum(r["self_ms"] for n, r in lime.items() if _is_op(n))
    lines += [
        f"Sum of self CPU time over all ops, ms per {unit}: LoRA {total_lora:.1f}, LiME {total_lime:.1f} "
        f"(+{total_lime - total_lora:.1f}, x{total_lime / max(total_lora, 1e-9):.3f}).",
        "",
        f"Top {TOP} ops by self CPU time, LiME E=8 ({kind}):",
        "",
        f"| op | LiME self ms/{unit} | LiME calls/{unit} | LoRA self ms/{unit} | LoRA calls/{unit} |",
        "|---|---:|---:|---:|---:|",
    ]
    zero = {"self_ms": 0.0, "calls": 0.0}
    ops = sorted((n for n in lime if _is_op(n)), key=lambda n: -lime[n]["self_ms"])[:TOP]
    for n in ops:
        a, b = lime[n], lora.get(n, zero)
        lines.append(f"| `{n}` | {_fmt(a['self_ms'])} | {a['calls']:.0f} | {_fmt(b['self_ms'])} | {b['calls']:.0f} |")
    lines += [
        "",
        f"Top {TOP} ops by self CPU time, LoRA ({kind}):",
        "",
        f"| op | LoRA self ms/{unit} | calls/{unit} |",
        "|---|---:|---:|",
    ]
    for n in sorted((n for n in lora if _is_op(n)), key=lambda n: -lora[n]["self_ms"])[:TOP]:
        lines.append(f"| `{n}` | {_fmt(lora[n]['self_ms'])} | {lora[n]['calls']:.0f} |")
    lines += [
        "",
        f"Largest increases LiME - LoRA ({kind}):",
        "",
        f"| op | extra self ms/{unit} | extra calls/{unit} |",
        "|---|---:|---:|",
    ]
    names = {n for n in set(lime) | set(lora) if _is_op(n)}
    delta = {n: (lime.get(n, zero)["self_ms"] - lora.get(n, zero)["self_ms"]) for n in names}
    for n in sorted(names, key=lambda n: -delta[n])[:TOP]:
        calls = lime.get(n, zero)["calls"] - lora.get(n, zero)["calls"]
        lines.append(f"| `{n}` | {_fmt(delta[n])} | {calls:+.0f} |")
    stages = sorted((n for n in lime if n.startswith("lime:")), key=lambda n: -lime[n]["total_ms"])
    if stages:
        lines += [
            "",
            f"LiME stages ({kind}, forward only, CPU time including children):",
            "",
            f"| stage | ms/{unit} | calls/{unit} |",
            "|---|---:|---:|",
        ]
        for n in stages:
            lines.append(f"| `{n}` | {_fmt(lime[n]['total_ms'])} | {lime[n]['calls']:.0f} |")
    return lines


def format_profile(profile: dict[str, Any], header: Optional[str] = None) -> str:
    """Markdown tables for one ``profile_pair`` result."""
    lines = [header or "# LiME E=8 vs LoRA: torch.profiler (CPU)", ""]
    lines += [f"## One train step (mean of {profile['steps']} profiled steps)", ""]
    lines += _tables("train step", profile["train"]["LoRA"], profile["train"]["LiME"], "step")
    lines += ["", f"## Decoding: one greedy generate call of {profile['decode_tokens']} new tokens (KV cache)", ""]
    lines += _tables("decode", profile["decode"]["LoRA"], profile["decode"]["LiME"], "call")
    return "\n".join(lines) + "\n"
