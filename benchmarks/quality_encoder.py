"""Quality, encoder variant: all-MiniLM-L6-v2 (a real BERT encoder) on mini-MMT's text and tabular tasks.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_encoder.py          # 3 seeds x 4 methods, a few minutes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_encoder.py --quick  # smoke run

A cheaper second backbone. One model is trained on all the tasks at once (multi-task, the point of LiME): the input
is "<task>: <prompt>", a shared classification head spans the union of the tasks' label sets (trained in full, in
modules_to_save), and a prediction is the arg-max over the logits of the example's OWN task's labels (closed-set,
never substring matching). Methods: LoRA r=8, LoRA at the rank matching LiME E=8's parameter count, LiME E=4 and
E=8 (Auto Top-K), on the query / key / value / attention-output / intermediate / output projections. MixLoRA is not
run here: it is defined on Llama-style gated MLPs (gate/up/down), which BERT does not have. Same steps, batch order
(per seed) and learning rate for every method; the test split is only scored.

Writes benchmarks/results/quality_encoder.md and quality_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402
from chat_data import minilm_dir  # noqa: E402
from mini_mmt import SplitCaps, load_mini_mmt  # noqa: E402

import peft_lime  # noqa: E402

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


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_once(method: str, rank: int, data: Any, tok: Any, space: tuple, seed: int, args) -> dict[str, Any]:
    labels, per_task = space
    index = {k: i for i, k in enumerate(labels)}
    torch.manual_seed(seed)
    model = build(method, len(labels), rank if "params" in method else 8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    train = data.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()

    def encode(batch: list) -> dict[str, torch.Tensor]:
        enc = tok(
            [f"{ex.task}: {ex.prompt}" for ex in batch],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        return dict(enc)

    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = [train[order[(step * args.batch_size + i) % len(order)]] for i in range(args.batch_size)]
        y = torch.tensor([index[f"{ex.task}:{ex.label}"] for ex in batch])
        loss = torch.nn.functional.cross_entropy(model(**encode(batch)).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()
    correct: dict[str, list[int]] = {t: [] for t in per_task}
    with torch.no_grad():
        for start in range(0, len(data.test), 32):
            batch = data.test[start : start + 32]
            logits = model(**encode(batch)).logits
            for ex, row in zip(batch, logits):
                own = per_task[ex.task]
                pred = labels[own[int(row[own].argmax())]]
                correct[ex.task].append(int(pred == f"{ex.task}:{ex.label}"))
    per_task_acc = {t: sum(v) / len(v) for t, v in correct.items() if v}
    macro = statistics.fmean(per_task_acc.values())
    logger.info("%s seed=%d: test macro %.3f (%.0fs train)", method, seed, macro, train_s)
    return {
        "method": method,
        "seed": seed,
        "trainable": trainable(model),
        "train_s": train_s,
        "macro": macro,
        "per_task": per_task_acc,
    }


def matched_rank(num_labels: int) -> int:
    """The LoRA rank whose trainable count comes closest to LiME E=8's (the head counts the same for both)."""
    one, two = (trainable(build("LoRA", num_labels, r)) for r in (1, 2))
    per_rank, fixed = two - one, 2 * one - two
    return max(1, round((trainable(build("LiME E=8", num_labels)) - fixed) / per_rank))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train_cap", type=int, default=96)
    p.add_argument("--test_cap", type=int, default=28)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.train_cap, args.test_cap = 2, args.seeds[:1], 4, 4
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    suite = load_mini_mmt(caps=SplitCaps(train=args.train_cap, validation=1, test=args.test_cap), tasks=TASKS)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    space = label_space(suite.train + suite.test)
    rank = matched_rank(len(space[0]))
    methods = ["LoRA r=8", f"LoRA r={rank} (params of LiME E=8)", "LiME E=4", "LiME E=8"]
    runs = [run_once(m, rank, suite, tok, space, seed, args) for m in methods for seed in args.seeds]
    summary = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        macros = [r["macro"] for r in rs]
        summary[m] = {
            "trainable": rs[0]["trainable"],
            "macro": (statistics.fmean(macros), statistics.stdev(macros) if len(macros) > 1 else 0.0),
            "per_task": {t: statistics.fmean(r["per_task"][t] for r in rs) for t in rs[0]["per_task"]},
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "summary": summary, "runs": runs, "seconds": time.perf_counter() - t_start}
    (out / "quality_encoder.json").write_text(json.dumps(result, indent=2))
    tasks = list(next(iter(summary.values()))["per_task"])
    lines = [
        "# LiME quality, encoder variant (all-MiniLM-L6-v2, multi-task classification)",
        "",
        f"Command: `python benchmarks/quality_encoder.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"{args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr:g}, seeds {args.seeds}; tasks {list(TASKS)}; "
        f"caps per task train {args.train_cap}, test {args.test_cap}; wall time {result['seconds'] / 60:.1f} min "
        "on 2 CPU cores. Prediction: arg-max over the example's own task labels.",
        "",
        "| method | trainable | macro (test) | " + " | ".join(tasks) + " |",
        "|---|---:|---:|" + "---:|" * len(tasks),
    ]
    for m, s in summary.items():
        lines.append(
            f"| {m} | {s['trainable']:,} | **{s['macro'][0]:.3f} +- {s['macro'][1]:.3f}** | "
            + " | ".join(f"{s['per_task'][t]:.3f}" for t in tasks)
            + " |"
        )
    (out / "quality_encoder.md").write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", out / "quality_encoder.md")
    return result


if __name__ == "__main__":
    main()
