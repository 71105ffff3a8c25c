"""Markdown of the separation benchmark (benchmarks/results/separation.md). Numbers never in scientific notation."""

from __future__ import annotations

from typing import Any

import numpy as np


def fmt_lr(lr: float) -> str:
    """A learning rate in positional notation (0.002, 0.0005), never 2e-03."""
    return np.format_float_positional(lr, trim="-")


def pts(x: float) -> str:
    """An accuracy difference in percentage points, signed, one decimal."""
    return f"{100 * x:+.1f}"


def ci(est: float, low: float, high: float, points: bool = False) -> str:
    if points:
        return f"{pts(est)} [{pts(low)}, {pts(high)}]"
    return f"{est:.3f} [{low:.3f}, {high:.3f}]"


def _usage(usage: dict[str, list[float]], task_names: list[str]) -> str:
    """Per task, the routing probability mass on each expert, as percentages (expert 0 first)."""
    cells = []
    for t, name in enumerate(task_names):
        row = usage.get(str(t))
        if row is not None:
            cells.append(f"{name}: " + " ".join(f"{100 * p:.0f}" for p in row))
    return "<br>".join(cells)


def to_markdown(result: dict[str, Any]) -> str:
    """The whole report."""
    a, m, s = result["args"], result["machine"], result["summary"]
    tasks = result["tasks"]
    names = [t["name"] for t in tasks]
    lines = [
        "# Separation benchmark: multi-task digit classification on all-MiniLM-L6-v2"
        + (" (quick smoke run: numbers are not meaningful)" if a["quick"] else ""),
        "",
        f"Command: `{result['command']}`.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {a['threads']} torch threads; Python {m['python']}, torch "
        f"{m['torch']}, transformers {m['transformers']}, peft {m['peft']}, peft-lime {m['peft_lime']} "
        f"({m['commit']}); {m['date']}. Wall time of this invocation: {result['seconds'] / 60:.1f} min "
        f"({result['reused_runs']} runs reused from the run log with --resume, {result['new_runs']} trained); "
        f"the {result.get('runs_used', '')} runs this report uses took {result.get('run_seconds', 0) / 60:.1f} min "
        "together (build, train, score; each timed when it ran)."
        + (f" Load average at the end: {m['load_average'][0]:.1f}." if m.get("load_average") else "")
        + (f" Note: {a['note']}" if a.get("note") else ""),
        "",
        "## Tasks",
        "",
        f"Input: a task word, then {a['num_digits']} digits separated by spaces (one token each), e.g. "
        f"`{result['example_input']}`. Every task answers with labels from one shared set, each with its own rule, "
        "over the same digit strings, so the label mappings conflict across tasks. Test: "
        f"{a['test_per_task']} items per task; validation {a['val_per_task']} per task (the same strings under every "
        "task; none of them occurs in training); training draws fresh strings at every step.",
        "",
        "| task word | rule | labels | majority-label accuracy (test) |",
        "|---|---|---|---:|",
    ]
    lines += [f"| {t['word']} | {t['description']} | {' '.join(t['labels'])} | {t['majority']:.3f} |" for t in tasks]
    lines += [
        "",
        "## Protocol (the same for every row)",
        "",
        f"Each micro-batch holds ONE task ({a['micro_batch']} examples); each optimizer step accumulates one "
        f"micro-batch of every task in a shuffled order ({len(tasks)} micro-batches, the order fixed by seed and "
        f"step), {a['steps']} steps. Loss: cross-entropy over the example's own task's labels (the head spans the "
        "union of the label sets and is trained in full, modules_to_save), divided by the number of tasks; LiME's "
        "injected balance gradient and MoLoRA's router loss are scaled the same way. AdamW (weight decay 0), linear "
        "warm-up over the first 10% of steps then cosine decay, gradient clipping 1.0. Adapters on query, key, value, "
        "attention output, intermediate and output projections of the 6 layers; lora_alpha = 2 r. The per-task upper "
        "bound trains one LoRA r=8 (and head) per task, each on exactly the micro-batches of its task: same steps, same "
        "data, each adapter sees its own task only (steps per task equal to the shared rows').",
        "",
        f"Learning rate: grid {', '.join(fmt_lr(x) for x in a['lrs'])} searched with seed {a['search_seed']} on the "
        "validation split; the lowest lr within 1 validation item of the best is chosen; a choice at an end of the "
        "grid widens it by one point on that side and searches again (up to "
        f"{a['max_widen']} times). Reporting seeds {a['seeds']} run at the chosen lr; the search seed is never "
        "scored on test. Intervals: paired two-level bootstrap "
        f"({a['bootstrap']} replicates): seeds resampled with replacement, test items resampled within each task, "
        "the same draws for every method; 95% percentile intervals.",
        "",
        "## Results (test macro accuracy, mean over the reporting seeds)",
        "",
        "| row | trainable | lr | macro [95% CI] | seed std | vs LoRA r=8, points [95% CI] | "
        + " | ".join(names)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(names),
    ]
    for name, r in s.items():
        diff = "reference" if r.get("vs_reference") is None else ci(*r["vs_reference"], points=True)
        cells = " | ".join(f"{v:.3f}" for v in r["per_task"])
        lines.append(
            f"| {name} | {r['trainable']:,} | {fmt_lr(r['lr'])} | {ci(*r['macro'])} | {r['seed_std']:.3f} | "
            f"{diff} | {cells} |"
        )
    if result.get("skipped_rows"):
        lines += ["", "Rows not run: " + "; ".join(result["skipped_rows"]) + "."]
    lines += ["", "## Other paired differences (points, 95% CI)", ""]
    lines += ["| difference | points [95% CI] | reading | chosen lrs |", "|---|---:|---|---:|"]
    for p in result["pairs"]:
        lrs = f"{fmt_lr(s[p['a']]['lr'])} / {fmt_lr(s[p['b']]['lr'])}"
        lines.append(f"| {p['a']} - {p['b']} | {ci(*p['diff'], points=True)} | {p['call']} | {lrs} |")
    if result.get("same_lr"):
        lines += [
            "",
            "## The two LiME rows at each other's lr (outside the protocol's lr choice)",
            "",
            "The protocol chose different lrs for the two LiME rows; both were also trained at each of those lrs "
            "(the same reporting seeds), so the balance scope can be compared at equal lr.",
            "",
            "| lr | row | macro [95% CI] | mutual information (nats) | difference global - micro-batch, points |",
            "|---:|---|---:|---:|---:|",
        ]
        for x in result["same_lr"]:
            for name in (x["a"], x["b"]):
                diff = ci(*x["diff"], points=True) if name == x["a"] else ""
                lines.append(
                    f"| {fmt_lr(x['lr'])} | {name} | {ci(*x['macro'][name])} | {x['mi'][name]:.4f} | {diff} |"
                )
    lines += [
        "",
        "## Routing of the LiME rows (test set, with task ids)",
        "",
        "Task-expert mutual information I(task; expert) in nats, from the token-weighted routing probabilities per "
        f"task (mean over layers; maximum log({min(len(tasks), 8)}) = {np.log(min(len(tasks), 8)):.3f}), mean +- std "
        "over the reporting seeds. Usage: per task, the mean routing probability of each expert (percent, experts "
        "0-7, mean over layers and seeds). Before training (seed 0, no step taken) the mutual information is "
        f"{result['untrained_routing'].get('mutual_information', float('nan')):.4f} nats.",
        "",
        "| row | mutual information (nats) | active experts / token | per-task usage (%) |",
        "|---|---:|---:|---|",
    ]
    for name, r in s.items():
        if r.get("routing"):
            g = r["routing"]
            lines.append(
                f"| {name} | {g['mi_mean']:.4f} +- {g['mi_std']:.4f} | {g['active_experts']:.2f} | "
                f"{_usage(g['task_usage'], names)} |"
            )
    lines += ["", "## Verdict", ""] + [f"- {v}" for v in result["verdict"]]
    lines += [
        "",
        f"## Learning-rate search (validation items correct of {result['val_items']}, seed {a['search_seed']})",
    ]
    lines += ["", "| row | grid searched | correct per lr | chosen | grid widened |", "|---|---|---|---:|---|"]
    for name, r in result["lr_search"].items():
        counts = ", ".join(
            f"{fmt_lr(float(lr))}: {n}" for lr, n in sorted(r["correct"].items(), key=lambda x: float(x[0]))
        )
        lines.append(
            f"| {name} | {', '.join(fmt_lr(x) for x in r['grid'])} | {counts} | {fmt_lr(r['chosen'])} | "
            f"{'; '.join(r['widened']) or 'no'} |"
        )
    return "\n".join(lines) + "\n"
