"""Markdown of the main job's seed benchmark (benchmarks/results/main_job_seeds.md), from its results dict.
Numbers never in scientific notation."""

from __future__ import annotations

from typing import Any

from ..bench.separation_report import ci, fmt_lr
from .seeds_runs import REFERENCE


def recipe_text(a: dict[str, Any]) -> str:
    """The training recipe every row shares, in one paragraph."""
    return (
        f"{a['steps']} optimizer steps of {a['batch_size']} shuffled mixed-task examples (each task an equal share "
        f"of the {a['train_cap']} training examples per task), transformers' Trainer, AdamW (betas 0.9 / 0.99, no "
        f"weight decay), linear warm-up over the first {100 * a['warmup_ratio']:.0f}% of the steps then cosine "
        f"decay, gradient clipping at 1.0; the patch projector (4 image tokens) trains at {a['projector_lr_ratio']:g}x "
        "the row's lr; LoRA on all seven projections with lora_alpha = 2 r, no dropout; LiME rows use LimeConfig's "
        "defaults unless the row says otherwise (the reference-balance row trains the expert vectors at 2.5x the lr "
        "through peft_lime.lime_param_groups). fp32 on CPU (bf16 autocast on a GPU)."
    )


def inherited_text(args: dict[str, Any]) -> str:
    """The sentence on the ablation rows' lr when they inherit the default row's (``--ablation_lr default``)."""
    if args.get("ablation_lr", "search") != "default":
        return ""
    return ("The LiME ablation rows do not search: they train at LiME E=8's chosen lr, so each changes one thing "
            "against that row. ")


def to_markdown(result: dict[str, Any]) -> str:
    """The whole report."""
    a, m, s = result["args"], result["machine"], result["summary"]
    tasks = result["tasks"]
    names = [t["name"] for t in tasks]
    lines = [
        "# Main job over seeds: LiME vs LoRA on mini-MMT (SmolLM2-135M)"
        + (" (quick smoke run: numbers are not meaningful)" if a["quick"] else ""),
        "",
        f"Command: `{result['command']}`.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, {a['threads']} torch threads"
        + (f", {m['cuda']}" if m.get("cuda") else "")
        + "; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; {m['commit']}; {m['date']}. Wall time of this invocation: {result['seconds'] / 60:.1f} min "
        f"({result['reused_runs']} runs reused from the run log with --resume, {result['new_runs']} trained); the "
        f"{result['runs_used']} runs this report uses took {result['run_seconds'] / 60:.1f} min together."
        + (f" Load average at the end: {m['load_average'][0]:.1f}." if m.get("load_average") else "")
        + (f" Note: {a['note']}" if a.get("note") else ""),
        "",
        "## Protocol",
        "",
        f"Every row trains {len(a['seeds'])} times, once per reporting seed {a['seeds']}. A seed fixes the starting "
        "weights (the projector and the LoRA tensors are drawn right after `torch.manual_seed(seed)`, so every row "
        "of a seed starts from bitwise identical projector and LoRA weights; LiME's expert vectors come from their "
        "own seeded generator) and the order of the training data; rows differ only in what the row names. "
        f"Recipe: {recipe_text(a)}",
        "",
        f"Learning rate: grid {', '.join(fmt_lr(x) for x in a['lrs'])} searched per row with seed {a['search_seed']} "
        "on the validation split (macro accuracy, counted in items); the lowest lr within 1 item of the best is "
        "chosen; a choice at an end of the grid widens it by one point on that side (up to "
        f"{a['max_widen']} times). {inherited_text(a)}The search seed is never scored on test. Intervals: paired two-level bootstrap "
        f"({a['bootstrap']} replicates): reporting seeds resampled with replacement and test items resampled within "
        "each task, the same draws for every row; 95% percentile intervals. A difference reads \"higher\" or "
        "\"lower\" only when its interval excludes 0.",
        "",
        "Test items per task: " + ", ".join(f"{t['name']} {t['test_items']}" for t in tasks)
        + "; validation items per task: " + ", ".join(f"{t['name']} {t['val_items']}" for t in tasks) + ".",
        "",
        "## Results (test macro accuracy, mean over the reporting seeds)",
        "",
        "| row | trainable | lr | macro [95% CI] | seed std | vs LoRA r=8, points [95% CI] | "
        + " | ".join(names) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(names),
    ]
    for name, r in s.items():
        diff = "reference" if r["vs_reference"] is None else ci(*r["vs_reference"], points=True)
        cells = " | ".join(f"{r['per_task'][t]:.3f}" for t in names)
        lines.append(f"| {name} | {r['trainable']:,} | {fmt_lr(r['lr'])} | {ci(*r['macro'])} | {r['seed_std']:.3f} | "
                     f"{diff} | {cells} |")
    if result.get("skipped_rows"):
        lines += ["", "Rows not run: " + "; ".join(result["skipped_rows"]) + "."]
    if result["pairs"]:
        lines += ["", "## LiME E=8 against the other rows (points, 95% CI)", "",
                  "| difference | points [95% CI] | reading | chosen lrs |", "|---|---:|---|---:|"]
        for p in result["pairs"]:
            lrs = f"{fmt_lr(s[p['a']]['lr'])} / {fmt_lr(s[p['b']]['lr'])}"
            lines.append(f"| {p['a']} - {p['b']} | {ci(*p['diff'], points=True)} | {p['call']} | {lrs} |")
    lines += ["", "## Verdict", ""] + [f"- {v}" for v in result["verdict"]]
    mi_rows = [(n, r["mi"]) for n, r in s.items() if "mi" in r]
    if mi_rows:
        lines += ["", "## Routing of the LiME rows (test split, with task ids)", "",
                  "Task-expert mutual information I(task; expert) in nats (peft_lime.get_routing_stats, mean over "
                  "layers), mean +- std over the reporting seeds.", "",
                  "| row | I(task; expert) | per seed |", "|---|---:|---|"]
        for n, mi in mi_rows:
            lines.append(f"| {n} | {mi['mean']:.4f} +- {mi['std']:.4f} | "
                         + ", ".join(f"{x:.4f}" for x in mi["per_seed"]) + " |")
    lines += ["", "## Recipe stability", "",
              "Gradient norms before clipping at 1.0, logged every "
              f"{a['logging_steps']} steps of the reporting runs: step 1 (the gradient at the starting weights, "
              "before any update; no warm-up changes it) and the largest after the warm-up. The main job's recipe "
              "(6% warm-up, projector lr fixed at 0.005) logged 12.6 and 18.3 at steps 1-2.", "",
              "| row | step 1, mean over seeds | largest after warm-up | mean train s |", "|---|---:|---:|---:|"]

    def num(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    for name, g in result["stability"].items():
        lines.append(f"| {name} | {num(g['step1_mean'])} | {num(g['after_warmup_max'])} | "
                     f"{s[name]['train_s']:.0f} |")
    lines += ["", f"## Learning-rate search (validation, seed {a['search_seed']}; score = macro x items)", "",
              "| row | grid searched | score per lr | chosen | grid widened |", "|---|---|---|---:|---|"]
    for name, r in result["lr_search"].items():
        if "inherited_from" in r:
            lines.append(f"| {name} | none: trains at {r['inherited_from']}'s lr | - | {fmt_lr(r['chosen'])} | - |")
            continue
        scores = ", ".join(f"{fmt_lr(float(lr))}: {v:.1f}" for lr, v in sorted(r["score"].items(),
                                                                               key=lambda x: float(x[0])))
        lines.append(f"| {name} | {', '.join(fmt_lr(x) for x in r['grid'])} | {scores} | {fmt_lr(r['chosen'])} | "
                     f"{'; '.join(r['widened']) or 'no'} |")
    lines += ["", f"Reference row for every difference: {REFERENCE}. Per-run records (per-task per-item correctness "
              "strings, trainable count, train seconds, gradient norms, routing) are in main_job_seeds_runs.jsonl."]
    return "\n".join(lines) + "\n"
