"""The protocol of benchmarks/quality.py: lr search on validation, seeds at the chosen lr, resumable run log.

A run is a dict with at least ``method``, ``lr``, ``seed``, ``trainable``, ``train_s`` and a ``test`` report
``{"macro": float, "per_task": {task: float}}`` (plus ``validation`` when there is an lr to choose, with per-task item
counts ``n`` when known). The test report is never used for a choice, and the seed that chose the lr is not part of
the reported test mean (``summarise``) whenever other seeds exist.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .paired_stats import choose_lr
from .separation_report import fmt_lr


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class RunLog:
    """Finished runs appended to a JSONL file as they end, so an interrupted benchmark keeps what it measured.

    With ``resume``, runs already in the file that were made under the same ``protocol`` (everything besides method,
    lr and seed that decides a result) are returned instead of being trained again; without it the file starts empty.
    """

    def __init__(self, path: Path, protocol: dict[str, Any], resume: bool = False) -> None:
        self.path = path
        self.protocol = json.loads(json.dumps(protocol))  # tuples -> lists, as they come back from JSON
        self.finished = self._load() if resume else {}
        if not self.finished:
            path.write_text("")

    def _load(self) -> dict[tuple[str, float, int], dict[str, Any]]:
        if not self.path.exists():
            return {}
        finished = {}
        for line in self.path.read_text().splitlines():
            run = json.loads(line) if line.strip() else None
            if run is not None and run.get("protocol") == self.protocol:
                finished[(run["method"], run["lr"], run["seed"])] = run
        return finished

    def get(self, method: str, lr: float, seed: int, train: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The finished run for (method, lr, seed), or ``train()``'s result, logged."""
        if (method, lr, seed) in self.finished:
            return self.finished[(method, lr, seed)]
        run = dict(train(), protocol=self.protocol)
        with self.path.open("a") as f:
            f.write(json.dumps(run) + "\n")
        return run


def search_then_seeds(
    methods: Sequence[str], lrs: Sequence[float], seeds: Sequence[int], run: Callable[[str, float, int], dict]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Same budget for every method: each lr of the grid with ``seeds[0]``, chosen on VALIDATION (the lowest lr
    within one item of the most items correct, see paired_stats.choose_lr), then the other seeds at that lr. Returns
    all runs and the chosen lr per method."""
    runs: list[dict[str, Any]] = []
    best_lr: dict[str, float] = {}
    for name in methods:
        search = [run(name, lr, seeds[0]) for lr in lrs]
        best_lr[name] = search[0]["lr"]
        if len(search) > 1:
            scored = {r["lr"]: validation_score(r["validation"]) for r in search}
            tolerance = min(tol for _, tol in scored.values())
            best_lr[name] = choose_lr({lr: score for lr, (score, _) in scored.items()}, tolerance)
        runs += search
        runs += [run(name, best_lr[name], seed) for seed in seeds[1:]]
    return runs, best_lr


def validation_score(report: dict[str, Any]) -> tuple[float, int]:
    """(score, tolerance) of a validation report for ``choose_lr``: items answered correctly (from the per-task
    accuracies and counts ``n``) with a tolerance of one item; without counts, the macro accuracy rounded to 6
    decimals (so two equal accuracies never differ by float noise) with no tolerance."""
    counts = report.get("n")
    if counts:
        return float(sum(round(report["per_task"][t] * n) for t, n in counts.items())), 1
    return round(report["macro"], 6), 0


def summarise(runs: list[dict[str, Any]], best_lr: dict[str, float]) -> dict[str, Any]:
    """Per method at its chosen lr: test macro and per-task mean +- std over the reporting seeds.

    The seed of the lr search (the first run of each method) chose the lr on validation; it is left out of the test
    mean whenever other seeds ran at the chosen lr (with a single seed it is all there is, and is reported).
    """
    out = {}
    for name, lr in best_lr.items():
        chosen = [r for r in runs if r["method"] == name and r["lr"] == lr]
        search_seed = next(r["seed"] for r in runs if r["method"] == name)
        if any(r["seed"] != search_seed for r in chosen):
            chosen = [r for r in chosen if r["seed"] != search_seed]
        tasks = list(chosen[0]["test"]["per_task"])
        out[name] = {
            "lr": lr,
            "seeds": [r["seed"] for r in chosen],
            "trainable": chosen[0]["trainable"],
            "macro": mean_std([r["test"]["macro"] for r in chosen]),
            "per_task": {t: mean_std([r["test"]["per_task"][t] for r in chosen]) for t in tasks},
            "train_s": statistics.fmean(r["train_s"] for r in chosen),
        }
    return out


def verdict(summary: dict[str, Any], lime: str = "LiME E=8") -> list[str]:
    """Plain-language comparison of ``lime`` with each other method (difference of means, in std units)."""
    ref = summary.get(lime)
    if ref is None:
        return []
    lines = []
    for name, s in summary.items():
        if name == lime:
            continue
        diff = ref["macro"][0] - s["macro"][0]
        noise = math.sqrt(ref["macro"][1] ** 2 + s["macro"][1] ** 2) or 1e-9
        word = "matches (within noise)" if abs(diff) <= noise else ("beats" if diff > 0 else "loses to")
        lines.append(f"- {lime} {word} {name}: {diff * 100:+.1f} macro-accuracy points ({diff / noise:+.1f} std).")
    return lines


def results_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows: method, trainable, chosen lr, test macro and per-task mean +- std."""
    tasks = list(next(iter(summary.values()))["per_task"])
    lines = [
        "| method | trainable | lr | macro (test) | " + " | ".join(tasks) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(tasks),
    ]
    for name, s in summary.items():
        cells = [f"{s['per_task'][t][0]:.3f} +- {s['per_task'][t][1]:.3f}" for t in tasks]
        lines.append(
            f"| {name} | {s['trainable']:,} | {fmt_lr(s['lr'])} | **{s['macro'][0]:.3f} +- {s['macro'][1]:.3f}** | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def chance_report(examples: Sequence[Any]) -> dict[str, Any]:
    """Accuracy of a uniform guess over each example's candidates: per task and macro (the floor to compare with)."""
    per_task: dict[str, list[float]] = {}
    for ex in examples:
        per_task.setdefault(ex.task, []).append(1.0 / len(ex.candidates))
    acc = {t: statistics.fmean(v) for t, v in per_task.items()}
    return {"macro": statistics.fmean(acc.values()), "per_task": acc}


def chance_line(chance: dict[str, Any], tasks: Sequence[str]) -> str:
    cells = ", ".join(f"{t} {chance['per_task'][t]:.3f}" for t in tasks if t in chance["per_task"])
    return f"Chance level (uniform guess over each task's candidates): macro {chance['macro']:.3f} ({cells})."


def lr_search_table(runs: list[dict[str, Any]], summary: dict[str, Any], lrs: Sequence[float], seed: int) -> list[str]:
    """Markdown section with the validation macro of every (method, lr) of the search."""
    lines = ["", f"## Learning-rate search (validation macro, seed {seed})", ""]
    lines += ["| method | " + " | ".join(f"lr {fmt_lr(lr)}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for name in summary:
        vals = {r["lr"]: r["validation"]["macro"] for r in runs if r["method"] == name and r["seed"] == seed}
        lines.append(f"| {name} | " + " | ".join(f"{vals.get(lr, float('nan')):.3f}" for lr in lrs) + " |")
    return lines


def plot_macro(summary: dict[str, Any], path: Path, xlabel: str) -> None:
    """Horizontal bars of test macro accuracy, mean +- std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh(
        range(len(names)),
        [summary[n]["macro"][0] for n in names],
        xerr=[summary[n]["macro"][1] for n in names],
        color="tab:green",
        alpha=0.8,
        capsize=3,
    )
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
