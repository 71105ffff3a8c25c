"""What static routing costs: dynamic LiME vs its per-task and global static exports, on the main job's data.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py                 # trains; writes outputs/demo/
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/static_export.py      # this comparison

Reads the main job's trained LiME adapter and projector (outputs/demo/adapter) and its settings (results.json),
rebuilds the same data splits, measures the routing profiles on TRAINING items (mean mixing weights of each task's
tokens, and of all tokens: peft_lime.recording_routing_profiles), then scores the evaluation split three ways: dynamic
routing (LiME as trained), per-task static routing (each task's items with its own task's profile: what one exported
LoRA per task serves) and global static routing (one profile for all: what one merged LoRA serves). It also exports
the per-task profiles as plain PEFT LoRA adapters, loads them WITHOUT LiME (PeftModel over a fresh base) and checks
that they score exactly like static routing. Paired bootstrap 95% intervals (items resampled within each task) of
each static variant minus dynamic.

Writes benchmarks/results/static_export.md and static_export.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

import peft_lime
from lime_examples.assets import fresh_base, load_causal_lm
from lime_examples.main_job.run_info import machine_info
from lime_examples.main_job.stats import correct_items, paired_bootstrap
from lime_examples.mini_mmt import (
    MiniVLM,
    PromptEncoder,
    SplitCaps,
    accuracy_report,
    load_mini_mmt,
    load_projector,
    score_examples,
)
from lime_examples.mini_mmt.data import Example

logger = logging.getLogger("static_export")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo_dir", default="outputs/demo", help="output_dir of examples/demo.py (adapter/, results.json)")
    p.add_argument("--profile_items", type=int, default=48, help="training items per task the profiles are measured on")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/static_export")
    return p.parse_args(argv)


def _score_per_task(vlm: MiniVLM, enc: PromptEncoder, examples: list[Example], profiles: dict, batch: int) -> list:
    """Scores of every item under its own task's static profile (same order as ``examples``)."""
    scores: list[Optional[list[float]]] = [None] * len(examples)
    for task in sorted({ex.task for ex in examples}):
        idx = [i for i, ex in enumerate(examples) if ex.task == task]
        with peft_lime.static_routing(vlm.lm, profiles[task]):
            task_scores = score_examples(vlm, enc, [examples[i] for i in idx], batch_size=batch, desc=f"static {task}")
        for i, s in zip(idx, task_scores):
            scores[i] = s
    return scores


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from peft import PeftModel

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    demo_dir = Path(args.demo_dir)
    demo = json.loads((demo_dir / "results.json").read_text())
    d = demo["args"]
    t_start = time.perf_counter()

    base, tokenizer, source = load_causal_lm(d.get("model"), torch.float32)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    data = load_mini_mmt(caps=SplitCaps(train=d["train_cap"], validation=d["val_cap"], test=d["test_cap"]),
                         seed=d["data_seed"])
    evals = data.split(d.get("eval_split", "test"))
    projector = load_projector(demo_dir / "adapter")
    enc = PromptEncoder(tokenizer, projector.config.num_patches, max_prompt_tokens=d["max_prompt_tokens"])
    lm = PeftModel.from_pretrained(base, str(demo_dir / "adapter")).eval()
    vlm = MiniVLM(lm, projector)
    batch = d.get("eval_batch_size", 16)
    task_names = [t.name for t in sorted(data.tasks, key=lambda t: t.task_id)]

    # Profiles from training items only (the evaluation split chooses nothing).
    per_task: dict[str, int] = {}
    profile_items = []
    for ex in data.train:
        if per_task.get(ex.task, 0) < args.profile_items:
            per_task[ex.task] = per_task.get(ex.task, 0) + 1
            profile_items.append(ex)
    peft_lime.enable_task_ids(lm)
    with peft_lime.recording_routing_profiles(lm, task_names) as recorder:
        score_examples(vlm, enc, profile_items, batch_size=batch, with_task_ids=True, desc="routing profiles")
    profiles = recorder.profiles()

    scores = {"dynamic": score_examples(vlm, enc, evals, batch_size=batch, desc="dynamic")}
    scores["static_per_task"] = _score_per_task(vlm, enc, evals, profiles, batch)
    with peft_lime.static_routing(lm, profiles["global"]):
        scores["static_global"] = score_examples(vlm, enc, evals, batch_size=batch, desc="static global")

    # The exported adapters, loaded by plain PEFT (no LiME layer anywhere), score like static routing.
    with tempfile.TemporaryDirectory() as tmp:
        written = peft_lime.export_static(lm, {name: profiles[name] for name in task_names}, tmp)
        exported_scores: list[Optional[list[float]]] = [None] * len(evals)
        for task in task_names:
            plain = PeftModel.from_pretrained(fresh_base(base.config, base_state, torch.device("cpu")),
                                              str(written[task])).eval()
            assert not any(isinstance(m, peft_lime.LimeLayer) for m in plain.modules())
            idx = [i for i, ex in enumerate(evals) if ex.task == task]
            got = score_examples(MiniVLM(plain, projector), enc, [evals[i] for i in idx], batch_size=batch,
                                 desc=f"exported {task}")
            for i, s in zip(idx, got):
                exported_scores[i] = s
    diff = max(abs(a - b) for r1, r2 in zip(exported_scores, scores["static_per_task"]) for a, b in zip(r1, r2))

    scores["exported_per_task"] = exported_scores
    correct = {k: correct_items(evals, v) for k, v in scores.items()}
    results = {
        "command": "python benchmarks/static_export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "model": source,
        "demo_command": demo.get("command"),
        "profile_items_per_task": per_task,
        "eval_items": len(evals),
        "accuracy": {k: accuracy_report(evals, v) for k, v in scores.items()},
        "minus_dynamic": {k: paired_bootstrap(evals, correct[k], correct["dynamic"], args.bootstrap)
                          for k in ("static_per_task", "static_global")},
        "exported_vs_static_max_abs_score_diff": diff,
        "exported_predictions_equal": correct["exported_per_task"] == correct["static_per_task"],
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(report(results, task_names))
    print(report(results, task_names))
    return results


def report(r: dict[str, Any], tasks: list[str]) -> str:
    """Markdown table of the three routings per task, with the paired intervals."""
    acc = r["accuracy"]
    cols = ["dynamic", "static_per_task", "static_global", "exported_per_task"]
    lines = [
        "# Static routing export: what it costs (main job data)", "",
        f"Command: `{r['command']}` (after `{r['demo_command']}`). Machine: {r['machine']['processor']}, "
        f"{r['machine']['cpu_count']} CPUs, torch {r['machine']['versions']['torch']}. {r['eval_items']} evaluation "
        f"items; profiles measured on training items {r['profile_items_per_task']}.", "",
        "| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols),
    ]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{acc[c]['per_task'][t]:.3f}" for c in cols) + " |")
    lines.append("| **macro** | " + " | ".join(f"**{acc[c]['macro']:.3f}**" for c in cols) + " |")
    lines.append("")
    for k, s in r["minus_dynamic"].items():
        lines.append(f"- {k} minus dynamic: {100 * s['estimate']:+.1f} points, 95% CI "
                     f"[{100 * s['ci_low']:+.1f}, {100 * s['ci_high']:+.1f}] (paired bootstrap, stratified by task)")
    lines.append(f"- exported LoRA adapters (plain PEFT, no LiME) vs static routing: max score difference "
                 f"{r['exported_vs_static_max_abs_score_diff']:.2e}, same predictions: {r['exported_predictions_equal']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
