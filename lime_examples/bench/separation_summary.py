"""Summary of the separation benchmark (benchmarks/separation.py): intervals per row, paired differences, the LiME
rows at equal lr, and a verdict that follows the intervals."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .digit_tasks import DigitSuite
from .paired_stats import PairedBootstrap, call
from .separation_report import fmt_lr, pts
from .separation_train import Row

REFERENCE = "LoRA r=8"
LIME_MICRO = "LiME E=8, micro-batch balance"
LIME_GLOBAL = "LiME E=8, global balance"
PER_TASK = "LoRA r=8 per task (upper bound)"


def correct_matrix(runs: list[dict[str, Any]], gold: list[str], split: str) -> np.ndarray:
    """(runs, items) 0/1: each run's predictions (one string per task) against the gold strings."""
    g = "".join(gold)
    return np.array([[p == q for p, q in zip("".join(r[split]), g)] for r in runs], dtype=np.int8)


def gold_strings(suite: DigitSuite, split: str) -> list[str]:
    out = [""] * len(suite.tasks)
    for ex in getattr(suite, split):
        out[ex.task] += ex.label
    return out


def summarise(
    rows: list[Row],
    runs: dict[str, list[dict[str, Any]]],
    chosen: dict[str, float],
    suite: DigitSuite,
    args: Any,
    wanted: Optional[list[tuple[str, str]]] = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per row: macro with its interval, seed std, per-task means, paired difference to LoRA r=8, routing; and the
    other paired differences (``wanted``: (a, b) pairs of row names; default: the main benchmark's)."""
    gold = gold_strings(suite, "test")
    sizes = [len(g) for g in gold]
    boot = PairedBootstrap(sizes, len(args.seeds), args.bootstrap)
    correct = {row.name: correct_matrix(runs[row.name], gold, "test") for row in rows}
    bounds = np.cumsum([0] + sizes)
    ref = correct.get(REFERENCE)
    summary: dict[str, Any] = {}
    for row in rows:
        c = correct[row.name]
        per_seed = [PairedBootstrap.point(c[i : i + 1], sizes) for i in range(len(c))]
        entry = {
            "kind": row.kind,
            "trainable": runs[row.name][0]["trainable"],
            "lr": chosen[row.name],
            "seeds": [r["seed"] for r in runs[row.name]],
            "macro": boot.interval(c),
            "seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
            "per_seed": per_seed,
            "per_task": [float(c[:, a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])],
            "vs_reference": None if row.name == REFERENCE or ref is None else boot.interval(c, ref),
            "train_s": float(np.mean([r["train_s"] for r in runs[row.name]])),
        }
        stats = [r["routing"] for r in runs[row.name] if r.get("routing")]
        if stats:
            mis = [s["mutual_information"] for s in stats]
            tasks = stats[0]["task_usage"]
            entry["routing"] = {
                "mi_mean": float(np.mean(mis)),
                "mi_std": float(np.std(mis, ddof=1)) if len(mis) > 1 else 0.0,
                "mi_per_seed": mis,
                "active_experts": float(np.mean([s["active_experts"] for s in stats])),
                "task_usage": {t: np.mean([s["task_usage"][t] for s in stats], axis=0).tolist() for t in tasks},
            }
        summary[row.name] = entry
    names = [row.name for row in rows]
    matched = [n for n in names if "(params of LiME E=8)" in n]
    if wanted is None:
        wanted = [(LIME_GLOBAL, LIME_MICRO)] + [(lime, o) for lime in (LIME_MICRO, LIME_GLOBAL) for o in matched]
        wanted += [(PER_TASK, lime) for lime in (LIME_MICRO, LIME_GLOBAL)]
    pairs = []
    for a, b in wanted:
        if a in correct and b in correct:
            diff = boot.interval(correct[a], correct[b])
            pairs.append({"a": a, "b": b, "diff": diff, "call": call(diff)})
    return summary, pairs


def verdict(
    summary: dict[str, Any],
    pairs: list[dict[str, Any]],
    untrained_mi: Optional[float],
    num_tasks: int,
    same_lr: Optional[list[dict[str, Any]]] = None,
) -> list[str]:
    """Sentences that follow the intervals, whatever they say."""

    def said(diff: tuple[float, float, float]) -> str:
        reading = {"higher": "higher (the 95% interval excludes 0)", "lower": "lower (the 95% interval excludes 0)"}
        est, low, high = diff
        word = reading.get(call(diff), "not resolved (the 95% interval contains 0)")
        return f"{pts(est)} points [{pts(low)}, {pts(high)}]: {word}"

    lines = []
    ceiling = min(num_tasks, 8)
    upper = summary.get(PER_TASK, {}).get("vs_reference")
    if upper is not None:
        ok = upper[1] >= 0.05
        lines.append(
            f"Headroom: one LoRA r=8 per task vs one shared LoRA r=8: {said(upper)}; "
            + (
                "the tasks leave at least 5 points for a shared adapter to recover."
                if ok
                else "the lower end of the interval is below 5 points, so this run does not establish the >= 5-point gap."
            )
        )
    for name, s in summary.items():
        if s.get("vs_reference") is not None and name != PER_TASK:
            lines.append(f"{name} vs LoRA r=8: {said(s['vs_reference'])}.")
    for p in pairs:
        la, lb = summary[p["a"]]["lr"], summary[p["b"]]["lr"]
        note = "" if la == lb else f" (the rows ran at different chosen lrs: {fmt_lr(la)} and {fmt_lr(lb)})"
        lines.append(f"{p['a']} vs {p['b']}: {said(p['diff'])}{note}.")
    for x in same_lr or []:
        lines.append(
            f"At the same lr {fmt_lr(x['lr'])} (outside the protocol's lr choice): {x['a']} vs {x['b']}: "
            f"{said(x['diff'])}."
        )
    beaten = [p["b"] for p in pairs if p["a"] == PER_TASK and call(p["diff"]) == "lower"]
    if beaten:
        lines.append(
            f"{', '.join(beaten)} scored above the per-task LoRAs: at this budget one LoRA per task is a reference "
            "point, not an upper bound."
        )
    for name, s in summary.items():
        if s.get("routing"):
            base = f" (untrained: {untrained_mi:.4f})" if untrained_mi is not None else ""
            lines.append(
                f"{name}: task-expert mutual information {s['routing']['mi_mean']:.4f} nats{base}; "
                f"a separate expert per task would give log({ceiling}) = {np.log(ceiling):.3f}."
            )
    return lines


def same_lr_check(
    lime_rows: list[Row], chosen: dict[str, float], run: Any, suite: DigitSuite, args: Any
) -> list[dict[str, Any]]:
    """The two LiME rows compared at EACH of their chosen lrs (seeds as reported), when the protocol chose different
    lrs for them: separates the effect of the balance scope from that of the lr choice. Outside the protocol's lr
    choice, reported apart."""
    if len(lime_rows) != 2 or chosen[lime_rows[0].name] == chosen[lime_rows[1].name]:
        return []
    gold = gold_strings(suite, "test")
    boot = PairedBootstrap([len(g) for g in gold], len(args.seeds), args.bootstrap)
    micro, glob = sorted(lime_rows, key=lambda r: r.name != LIME_MICRO)
    out = []
    for lr in sorted({chosen[micro.name], chosen[glob.name]}):
        runs = {row.name: [run(row, lr, seed, ("test",)) for seed in args.seeds] for row in (glob, micro)}
        c = {name: correct_matrix(r, gold, "test") for name, r in runs.items()}
        diff = boot.interval(c[glob.name], c[micro.name])
        out.append(
            {
                "lr": lr,
                "a": glob.name,
                "b": micro.name,
                "macro": {name: boot.interval(m) for name, m in c.items()},
                "mi": {
                    name: float(np.mean([x["routing"]["mutual_information"] for x in r])) for name, r in runs.items()
                },
                "diff": diff,
                "call": call(diff),
            }
        )
    return out
