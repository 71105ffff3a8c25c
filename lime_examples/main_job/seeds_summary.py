"""Summary of the main job's seed benchmark: per-row macro accuracy with a two-level paired bootstrap interval,
per-task means, seed spread, paired differences and verdict sentences that follow the intervals.

Runs are the records of ``seeds_runs.run_once``: ``{"method", "lr", "seed", "trainable", "train_s", "test": {task:
"0110..."}, "routing": {...} (LiME rows)}``. Items are ordered task by task (the tasks in the order of the first
run's ``test``), so a run is one row of a (seeds, items) 0/1 matrix; every row of the report must hold the same seeds
in the same order (a seed fixes the starting weights and the data order, so seeds pair across rows). The bootstrap
(lime_examples.bench.paired_stats.PairedBootstrap) resamples seeds with replacement and test items within each task,
the same draws for every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from ..bench.paired_stats import PairedBootstrap, call
from .seeds_runs import LIME, REFERENCE

UNIFORM = f"{LIME} uniform routing"
# Routing is worth a router when the oracle beats uniform routing by this much (issue 23, part 4).
HEADROOM_BAR = 0.03


def task_layout(runs: Sequence[dict[str, Any]], split: str = "test") -> tuple[list[str], list[int]]:
    """(task names, items per task) of ``split``, checked to be the same in every run."""
    first = runs[0][split]
    tasks, sizes = list(first), [len(s) for s in first.values()]
    for r in runs:
        if list(r[split]) != tasks or [len(s) for s in r[split].values()] != sizes:
            raise ValueError(f"runs: {r['method']} seed {r['seed']} has another {split} layout than the first run")
    return tasks, sizes


def correct_matrix(runs: Sequence[dict[str, Any]], split: str = "test") -> np.ndarray:
    """(runs, items) 0/1 from the runs' correctness strings, items task by task."""
    return np.array([[c == "1" for c in "".join(r[split].values())] for r in runs], dtype=np.int8)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(
    runs: dict[str, list[dict[str, Any]]], chosen: dict[str, float], replicates: int = 2000
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per row (in ``runs`` order): macro [95% CI], seed std, per-seed and per-task means, difference to LoRA r=8,
    routing mutual information; and the paired differences of LiME E=8 to the matched LoRA and to each ablation."""
    all_runs = [r for rs in runs.values() for r in rs]
    tasks, sizes = task_layout(all_runs)
    seeds = [r["seed"] for r in next(iter(runs.values()))]
    for name, rs in runs.items():
        if [r["seed"] for r in rs] != seeds:
            raise ValueError(f"runs: {name} has seeds {[r['seed'] for r in rs]}, the first row {seeds}")
    boot = PairedBootstrap(sizes, len(seeds), replicates)
    correct = {name: correct_matrix(rs) for name, rs in runs.items()}
    bounds = np.cumsum([0] + sizes)
    ref = correct.get(REFERENCE)
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        c = correct[name]
        per_seed = [PairedBootstrap.point(c[i : i + 1], sizes) for i in range(len(c))]
        entry: dict[str, Any] = {
            "trainable": rs[0]["trainable"],
            "lr": chosen[name],
            "seeds": seeds,
            "macro": boot.interval(c),
            "seed_std": _mean_std(per_seed)[1],
            "per_seed": per_seed,
            "per_task": {t: float(c[:, a:b].mean()) for t, a, b in zip(tasks, bounds[:-1], bounds[1:])},
            "vs_reference": None if name == REFERENCE or ref is None else boot.interval(c, ref),
            "train_s": float(np.mean([r["train_s"] for r in rs])),
        }
        mis = [r["routing"]["mutual_information"] for r in rs if (r.get("routing") or {}).get("mutual_information")
               is not None]
        if mis:
            entry["mi"] = {"mean": _mean_std(mis)[0], "std": _mean_std(mis)[1], "per_seed": mis}
        summary[name] = entry
    pairs = []
    if LIME in correct:
        others = [n for n in runs if n not in (LIME, REFERENCE)]  # matched LoRA and the ablations
        for other in others:
            diff = boot.interval(correct[LIME], correct[other])
            pairs.append({"a": LIME, "b": other, "diff": diff, "call": call(diff)})
    if UNIFORM in correct:  # routing headroom: what knowing the task adds over no router (the issue's 3-point bar)
        for oracle in (n for n in runs if n.startswith(f"{LIME} oracle")):
            diff = boot.interval(correct[oracle], correct[UNIFORM])
            pairs.append({"a": oracle, "b": UNIFORM, "diff": diff, "call": call(diff)})
    return summary, pairs


def said(diff: Sequence[float]) -> str:
    """A difference in points with its interval and the reading the interval allows."""
    est, low, high = (100 * x for x in diff)
    reading = {
        "higher": "higher (the 95% interval excludes 0)",
        "lower": "lower (the 95% interval excludes 0)",
    }.get(call(tuple(diff)), "not resolved (the 95% interval contains 0)")
    return f"{est:+.1f} points [{low:+.1f}, {high:+.1f}]: {reading}"


def verdict(summary: dict[str, Any], pairs: list[dict[str, Any]], num_tasks: int) -> list[str]:
    """One sentence per difference, worded from its interval only; then the routing mutual information."""
    from ..bench.separation_report import fmt_lr

    def lrs(a: str, b: str) -> str:
        la, lb = summary[a]["lr"], summary[b]["lr"]
        return "" if la == lb else f" (chosen lrs {fmt_lr(la)} and {fmt_lr(lb)})"

    lines = []
    for name, s in summary.items():
        if s["vs_reference"] is not None:
            lines.append(f"{name} minus {REFERENCE}: {said(s['vs_reference'])}{lrs(name, REFERENCE)}.")
    for p in pairs:
        lines.append(f"{p['a']} minus {p['b']}: {said(p['diff'])}{lrs(p['a'], p['b'])}.")
        if p["b"] == UNIFORM and p["a"] != LIME:
            est, low = p["diff"][0], p["diff"][1]
            reach = "reaches" if est >= HEADROOM_BAR else "falls short of"
            sure = "; its interval lies above it" if low >= HEADROOM_BAR else ""
            lines.append(f"Routing headroom: {p['a']} {reach} the {100 * HEADROOM_BAR:.0f}-point bar over uniform "
                         f"routing (point estimate){sure}.")
    ceiling = np.log(min(num_tasks, 8))
    for name, s in summary.items():
        if "mi" in s:
            lines.append(
                f"{name}: task-expert mutual information {s['mi']['mean']:.4f} +- {s['mi']['std']:.4f} nats over the "
                f"seeds (one expert per task would give log({min(num_tasks, 8)}) = {ceiling:.3f})."
            )
    return lines


def recipe_stability(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Optional[float]]]:
    """Per row, over its reporting runs: the mean gradient norm of step 1 (before any update: the gradient at the
    starting weights, which no warm-up can change) and the largest norm logged after the warm-up (a spike there is
    the sign of an unstable recipe). Norms are measured before clipping; None when none was logged."""
    out: dict[str, dict[str, Optional[float]]] = {}
    for name, rs in runs.items():
        first = [g for r in rs for step, g in r.get("grad_norms") or [] if step == 1]
        later = [g for r in rs for step, g in r.get("grad_norms") or [] if step > r.get("warmup_steps", 0)]
        out[name] = {"step1_mean": float(np.mean(first)) if first else None,
                     "after_warmup_max": float(max(later)) if later else None}
    return out
