"""Statistics of the main job: per-item correctness, prediction diversity and a task-stratified paired bootstrap."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..mini_mmt.data import Example
from ..mini_mmt.scoring import predictions


def correct_items(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> list[int]:
    """1 where the arg-max candidate is the gold label, else 0 (same order as ``examples``)."""
    if len(examples) != len(scores):
        raise ValueError(f"scores: {len(scores)} score rows for {len(examples)} examples")
    return [int(p == ex.label_index) for ex, p in zip(examples, predictions(scores))]


def distinct_predictions(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> dict[str, dict[str, Any]]:
    """Per task: how many different answers the model gives, how many labels the task has, and the share of the
    most frequent answer (1.0: the model is stuck on one constant answer)."""
    preds: dict[str, Counter] = defaultdict(Counter)
    for ex, p in zip(examples, predictions(scores)):
        preds[ex.task][ex.candidates[p]] += 1
    out = {}
    for task, counts in preds.items():
        n = sum(counts.values())
        labels = next(len(ex.candidates) for ex in examples if ex.task == task)
        top, top_n = counts.most_common(1)[0]
        out[task] = {"distinct": len(counts), "labels": labels, "most_common": top, "most_common_share": top_n / n}
    return out


def paired_bootstrap(
    examples: Sequence[Example],
    correct_a: Sequence[int],
    correct_b: Sequence[int],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Macro accuracy of A minus macro accuracy of B, with a percentile bootstrap interval.

    Both systems are scored on the same items, so the items are resampled once for both (paired), with replacement
    and within each task (stratified: every resample keeps each task's size, so the macro mean weighs the tasks as the
    point estimate does).
    """
    if not (len(examples) == len(correct_a) == len(correct_b)):
        raise ValueError(f"correct_a / correct_b: lengths {len(correct_a)}, {len(correct_b)} for {len(examples)} items")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_task[ex.task].append(i)
    diff = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_resamples)
    per_task = {}
    for task in sorted(by_task):
        d = diff[by_task[task]]
        per_task[task] = float(d.mean())
        boot += d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(axis=1)
    boot /= len(by_task)
    alpha = (1.0 - confidence) / 2.0
    low, high = (float(x) for x in np.quantile(boot, [alpha, 1.0 - alpha]))
    return {
        "estimate": float(np.mean(list(per_task.values()))),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "resamples": n_resamples,
        "stratified_by": "task",
        "excludes_zero": low > 0.0 or high < 0.0,
        "per_task": per_task,
    }
