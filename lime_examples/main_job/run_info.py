"""Run description for results files (machine, versions) and the main job's final summary table."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any


def machine_info() -> dict[str, Any]:
    """Platform, processor, logical CPUs, torch threads and the versions of the packages that matter."""
    import peft
    import torch
    import transformers

    import peft_lime

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "peft_lime": peft_lime.__version__,
        },
    }


# What one training run per method can and cannot show (issue 23).
SINGLE_RUN_NOTE = (
    "One training run per method: these intervals resample the test items only, so they say how sure this run's "
    "scores are, not how a method compares with another: training noise is not in them (on this job, changing only "
    "the thread count moved LoRA's digits score from 0.695 to 0.23). For a method "
    "comparison use benchmarks/main_job_seeds.py (5 seeds per method, lr chosen per method on validation, seeds and "
    "items resampled)."
)


def _ci(stat: Mapping[str, Any]) -> str:
    return (f"{100 * stat['estimate']:+.1f} points, {100 * stat['confidence']:.0f}% CI "
            f"[{100 * stat['ci_low']:+.1f}, {100 * stat['ci_high']:+.1f}]")


def format_summary(r: Mapping[str, Any]) -> str:
    """The per-task table (before / after / distinct answers, compared methods) and the macro gains with intervals."""
    before, after = r["accuracy_before"], r["accuracy_after"]
    others = {m: c["accuracy_after"] for m, c in r["compare"].items()}
    t = r["timing"]
    lines = [f"\nLiME on mini-MMT ({r['model']}, {r['device']}, {r['machine']['torch_threads']} threads): "
             f"{r['train']['steps']} steps in {r['train']['seconds']:.0f}s, total {t['total_s']:.0f}s; "
             f"{r['eval_split']} split"]
    head = f"{'task':14s} {'n':>4s} {'chance':>6s} {'before':>6s} {'after':>6s} {'answers':>8s}"
    head += "".join(f" {m + ' after':>11s}" for m in others)
    lines.append(head)
    for task, acc in after["per_task"].items():
        pred = after["predictions"][task]
        b = f"{before['per_task'][task]:6.3f}" if before else f"{'-':>6s}"
        row = f"{task:14s} {after['n'][task]:4d} {r['chance'][task]:6.3f} {b} {acc:6.3f} "
        row += f"{pred['distinct']:>3d} of {pred['labels']:<2d}"
        row += "".join(f" {o['per_task'][task]:11.3f}" for o in others.values())
        lines.append(row)
    macro = f"{'MACRO':14s} {sum(after['n'].values()):4d} {sum(r['chance'].values()) / len(r['chance']):6.3f} "
    macro += (f"{before['macro']:6.3f}" if before else f"{'-':>6s}") + f" {after['macro']:6.3f} {'':8s}"
    macro += "".join(f" {o['macro']:11.3f}" for o in others.values())
    lines.append(macro)
    for name, stat in r["bootstrap"].items():
        lines.append(f"{name.replace('_', ' ')}: {_ci(stat)} (paired bootstrap over the test items of this run, "
                     f"{stat['resamples']} resamples, stratified by task)")
    if r["bootstrap"]:
        lines.append(SINGLE_RUN_NOTE)
    check = r.get("reload_check")
    if check:
        lines.append(f"reloaded adapter: predictions equal = {check['predictions_equal']}, "
                     f"max |score diff| = {check['max_abs_score_diff']:.2e}")
    routing = r.get("routing") or {}
    if routing.get("task_expert_mutual_information") is not None:
        lines.append(f"I(task; expert) = {routing['task_expert_mutual_information']:.4f} nats")
    lines.append("timing (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in t.items()))
    return "\n".join(lines)
