"""Quality, encoder variant: all-MiniLM-L6-v2 (a real BERT encoder) on mini-MMT's text and tabular tasks.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_encoder.py          # 4 methods, 2 lrs, 3 seeds
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_encoder.py --quick  # smoke run

A cheaper second backbone. One model is trained on all the tasks at once (multi-task, the point of LiME): the input
is "<task>: <prompt>", a shared classification head spans the union of the tasks' label sets (trained in full, in
modules_to_save), trained with a softmax over the example's OWN task's labels, and a prediction is the arg-max over
those same logits (closed-set, never substring matching). Methods: LoRA r=8, LoRA at the rank matching LiME E=8's parameter count, LiME E=4 and
E=8 (Auto Top-K), on the query / key / value / attention-output / intermediate / output projections. MixLoRA is not
run here: it is defined on Llama-style gated MLPs (gate/up/down), which BERT does not have. The protocol is
quality.py's (lime_examples/bench/quality_common.py): same steps and batch order (per seed) for every method, the lr
grid searched with the first seed on the VALIDATION split, the other seeds at the chosen lr; the test split is only
scored.

Writes benchmarks/results/quality_encoder.md, quality_encoder.json and quality_encoder_runs.jsonl (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

import peft_lime
from lime_examples.assets import minilm_dir
from lime_examples.bench.harness import trainable_parameters as trainable
from lime_examples.bench.quality_common import (
    RunLog,
    chance_line,
    chance_report,
    lr_search_table,
    plot_macro,
    results_table,
    search_then_seeds,
    summarise,
    verdict,
)
from lime_examples.mini_mmt import SplitCaps, load_mini_mmt

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("quality_encoder")
TASKS = ("chat_topic", "iris", "wine", "breast_cancer")
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def label_space(examples: list) -> tuple[list[str], dict[str, list[int]]]:
    """Union of (task, label) pairs as head indices, and each task's own indices."""
    labels: list[str] = []
    per_task: dict[str, list[int]] = {}
    for ex in examples:
        for cand in ex.candidates:
            key = f"{ex.task}:{cand}"
            if key not in labels:
                labels.append(key)
                per_task.setdefault(ex.task, []).append(len(labels) - 1)
    return labels, per_task


def build(method: str, num_labels: int, rank: int = 8) -> torch.nn.Module:
    """MiniLM + classification head (fully trained) + the method's adapter at LoRA rank ``rank``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=num_labels)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, modules_to_save=["classifier"])
    if method.startswith("LiME"):
        return get_peft_model(model, peft_lime.LimeConfig(base=lora, num_experts=int(method.split("=")[1])))
    return get_peft_model(model, lora)


def encode(tok: Any, batch: Sequence) -> dict[str, torch.Tensor]:
    """ "<task>: <prompt>" for every example: one model for all the tasks, told which one it is answering."""
    texts = [f"{ex.task}: {ex.prompt}" for ex in batch]
    return dict(tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, tok: Any, examples: Sequence, space: tuple) -> dict[str, Any]:
    """Per-task accuracy (arg-max over the example's own task's labels) and their macro mean."""
    labels, per_task = space
    model.eval()
    correct: dict[str, list[int]] = {t: [] for t in per_task}
    for start in range(0, len(examples), 32):
        batch = examples[start : start + 32]
        for ex, row in zip(batch, model(**encode(tok, batch)).logits):
            own = per_task[ex.task]
            correct[ex.task].append(int(labels[own[int(row[own].argmax())]] == f"{ex.task}:{ex.label}"))
    acc = {t: sum(v) / len(v) for t, v in correct.items() if v}
    return {"macro": statistics.fmean(acc.values()), "per_task": acc}


def own_task_mask(batch: Sequence, per_task: dict[str, list[int]], num_labels: int) -> torch.Tensor:
    """(B, num_labels): 0 on each example's own task's labels, -inf elsewhere."""
    mask = torch.full((len(batch), num_labels), float("-inf"))
    for i, ex in enumerate(batch):
        mask[i, per_task[ex.task]] = 0.0
    return mask


def run_once(method: str, rank: int, data: Any, tok: Any, space: tuple, lr: float, seed: int, args) -> dict[str, Any]:
    """Train one method with one (lr, seed); score validation (when there is an lr to choose) and test."""
    labels, per_task = space
    index = {k: i for i, k in enumerate(labels)}
    torch.manual_seed(seed)
    model = build(method, len(labels), rank if "params" in method else 8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    train = data.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = [train[order[(step * args.batch_size + i) % len(order)]] for i in range(args.batch_size)]
        y = torch.tensor([index[f"{ex.task}:{ex.label}"] for ex in batch])
        # Train with the rule used to predict: a softmax over the example's own task's labels only.
        logits = model(**encode(tok, batch)).logits + own_task_mask(batch, per_task, len(labels))
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {"method": method, "lr": lr, "seed": seed, "trainable": trainable(model)}
    out["train_s"] = time.perf_counter() - t0
    for split in ("validation", "test") if len(args.lrs) > 1 else ("test",):
        out[split] = evaluate(model, tok, getattr(data, split), space)
    logger.info(
        "%s lr=%g seed=%d: test macro %.3f (%.0fs train)", method, lr, seed, out["test"]["macro"], out["train_s"]
    )
    return out


def matched_rank(num_labels: int) -> int:
    """The LoRA rank whose trainable count comes closest to LiME E=8's (the head counts the same for both)."""
    one, two = (trainable(build("LoRA", num_labels, r)) for r in (1, 2))
    per_rank, fixed = two - one, 2 * one - two
    return max(1, round((trainable(build("LiME E=8", num_labels)) - fixed) / per_rank))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 lr, 2 steps, tiny caps")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train_cap", type=int, default=256)
    p.add_argument("--val_cap", type=int, default=16)
    p.add_argument("--test_cap", type=int, default=28)
    p.add_argument("--resume", action="store_true", help="reuse finished runs made with this same protocol")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.lrs, args.seeds = 2, args.lrs[:1], args.seeds[:1]
        args.train_cap, args.val_cap, args.test_cap = 4, 2, 4
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    caps = SplitCaps(train=args.train_cap, validation=args.val_cap, test=args.test_cap)
    suite = load_mini_mmt(caps=caps, tasks=TASKS)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    space = label_space(suite.train + suite.validation + suite.test)
    rank = matched_rank(len(space[0]))
    methods = ["LoRA r=8", f"LoRA r={rank} (params of LiME E=8)", "LiME E=4", "LiME E=8"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("steps", "batch_size", "lrs", "train_cap", "val_cap", "test_cap")
    log = RunLog(out / "quality_encoder_runs.jsonl", {k: getattr(args, k) for k in keys}, resume=args.resume)

    def run(method: str, lr: float, seed: int) -> dict[str, Any]:
        return log.get(method, lr, seed, lambda: run_once(method, rank, suite, tok, space, lr, seed, args))

    runs, best_lr = search_then_seeds(methods, args.lrs, args.seeds, run)
    summary = summarise(runs, best_lr)
    result = {
        "args": vars(args),
        "summary": summary,
        "verdict": verdict(summary),
        "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "quality_encoder.json").write_text(json.dumps(result, indent=2))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# LiME quality, encoder variant (all-MiniLM-L6-v2, multi-task classification)",
        "",
        f"Command: `python benchmarks/quality_encoder.py {command}`; {args.steps} steps, batch {args.batch_size}, "
        f"AdamW, lr grid {args.lrs} searched with seed {args.seeds[0]} on the validation split, seeds {args.seeds} at "
        f"the chosen lr; tasks {list(TASKS)}; caps per task train {args.train_cap}, validation {args.val_cap}, test "
        f"{args.test_cap}; wall time of this invocation {result['seconds'] / 60:.1f} min on {args.threads} CPU "
        "threads. Prediction: arg-max over the example's own task labels. The test split is never used for a choice.",
        "",
    ]
    lines += results_table(summary) + ["", chance_line(chance_report(suite.test), TASKS)]
    lines += ["", "## Verdict", ""] + (result["verdict"] or ["- (LiME E=8 not in this run)"])
    if len(args.lrs) > 1:
        lines += lr_search_table(runs, summary, args.lrs, args.seeds[0])
    (out / "quality_encoder.md").write_text("\n".join(lines) + "\n")
    plot_macro(summary, out / "quality_encoder.png", "MiniLM multi-task test macro accuracy (mean +- std over seeds)")
    logger.info("wrote %s (%.1f min)", out / "quality_encoder.md", result["seconds"] / 60)
    return result


if __name__ == "__main__":
    main()
