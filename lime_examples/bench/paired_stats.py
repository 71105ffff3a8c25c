"""Statistics of the separation benchmark: lr choice with a stated tie rule, and paired bootstrap intervals.

Learning rate: the grid is searched with one seed on the VALIDATION split; the score is the number of validation
items answered correctly (every task has the same number, so it is the macro accuracy times the split size). Among
the lrs within ``tolerance`` items of the best, the LOWEST is chosen (a difference of one item is noise, and a float
comparison of two equal accuracies would otherwise decide). A choice at either end of the grid means the grid did not
bracket the optimum: the caller widens it by one point on that side and searches again.

Intervals: paired, two-level bootstrap. Each replicate resamples the reporting seeds (with replacement, the SAME
seeds for every method, since a seed fixes the data order and initialisation) and the test items within each task
(with replacement, the SAME items for every method); a method's replicate is its macro accuracy (mean over tasks of
the mean over the drawn seeds and items). The 95% interval of a difference is the 2.5 / 97.5 percentiles of the
replicate differences, so it covers both test-set sampling and seed-to-seed variation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np


def choose_lr(correct: dict[float, float], tolerance: float = 1) -> float:
    """The lowest lr whose validation count is within ``tolerance`` items of the best count."""
    if not correct:
        raise ValueError("correct: no lr was scored")
    best = max(correct.values())
    return min(lr for lr, n in correct.items() if n >= best - tolerance)


def grid_edge(chosen: float, grid: Sequence[float]) -> Optional[str]:
    """ "low" / "high" when ``chosen`` is the smallest / largest lr of ``grid`` (a grid of one point: "low"), else
    None."""
    ordered = sorted(grid)
    if chosen == ordered[0]:
        return "low"
    if chosen == ordered[-1]:
        return "high"
    return None


def widen(grid: Sequence[float], side: str) -> float:
    """The next grid point beyond ``side``, at the grid's own ratio between neighbours (x2 for a single point)."""
    ordered = sorted(grid)
    ratio = ordered[1] / ordered[0] if len(ordered) > 1 else 2.0
    return ordered[0] / ratio if side == "low" else ordered[-1] * ratio


class PairedBootstrap:
    """Replicates of macro accuracy for methods scored on the same items with the same seeds.

    Args:
        task_sizes: number of test items of each task (items are ordered task by task).
        num_seeds: reporting seeds per method.
        replicates: bootstrap replicates.
        seed: seed of the resampling (fixed: the intervals of a results file are reproducible).
    """

    def __init__(self, task_sizes: Sequence[int], num_seeds: int, replicates: int = 2000, seed: int = 12345) -> None:
        rng = np.random.default_rng(seed)
        self.task_sizes = list(task_sizes)
        self.num_seeds = num_seeds
        seed_draws = rng.integers(0, num_seeds, size=(replicates, num_seeds))
        # (B, S) weight of each seed in each replicate (how often it was drawn / S).
        self.seed_weights = np.stack([np.bincount(row, minlength=num_seeds) for row in seed_draws]) / num_seeds
        offsets = np.cumsum([0] + self.task_sizes[:-1])
        self.items = [off + rng.integers(0, n, size=(replicates, n)) for off, n in zip(offsets, self.task_sizes)]

    def replicates(self, correct: np.ndarray) -> np.ndarray:
        """(B,) macro accuracy replicates of one method from its (seeds, items) 0/1 correctness matrix."""
        if correct.shape != (self.num_seeds, sum(self.task_sizes)):
            raise ValueError(f"correct: expected shape {(self.num_seeds, sum(self.task_sizes))}, got {correct.shape}")
        per_item = self.seed_weights @ correct.astype(np.float64)  # (B, N): seed-averaged score of each item
        per_task = [np.take_along_axis(per_item, idx, axis=1).mean(axis=1) for idx in self.items]
        return np.mean(per_task, axis=0)

    @staticmethod
    def point(correct: np.ndarray, task_sizes: Sequence[int]) -> float:
        """Macro accuracy of the full data: mean over tasks of the mean over seeds and items."""
        bounds = np.cumsum([0] + list(task_sizes))
        return float(np.mean([correct[:, a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])]))

    def interval(self, correct: np.ndarray, reference: Optional[np.ndarray] = None) -> tuple[float, float, float]:
        """(estimate, low, high): the macro accuracy of ``correct`` with its 95% interval, or, with ``reference``,
        the paired difference correct - reference with its 95% interval."""
        est = self.point(correct, self.task_sizes)
        reps = self.replicates(correct)
        if reference is not None:
            est -= self.point(reference, self.task_sizes)
            reps = reps - self.replicates(reference)
        low, high = np.percentile(reps, [2.5, 97.5])
        return est, float(low), float(high)


def call(diff: tuple[float, float, float]) -> str:
    """Plain reading of a difference interval: "higher", "lower" or "not resolved" (the interval contains 0)."""
    _, low, high = diff
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "not resolved"
