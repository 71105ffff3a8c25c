"""Separation benchmark: can LiME do what an equal-size LoRA cannot, on tasks where experts can help?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/separation.py            # full run (~30 min on 2 CPU cores)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/separation.py --quick    # smoke run (seconds; numbers meaningless)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/separation.py --resume   # reuse finished runs of the same protocol

all-MiniLM-L6-v2 (BERT encoder) learns several digit-string tasks at once (lime_examples/bench/digit_tasks.py): the
same inputs, conflicting rules, one shared label set, the task named by the first word. One shared LoRA must
compromise; one LoRA per task need not (the upper bound). Rows: LoRA r=8 (the reference and lower bound), LoRA at
LiME E=8's trainable count, LiME E=8 with micro-batch and with global load balance, a MoLoRA-style mixture at LiME
E=8's count, and one LoRA r=8 per task. Protocol (lime_examples/bench/separation_train.py): single-task
micro-batches, gradient accumulation over one micro-batch per task, lr searched on validation with seed 0, seeds 1-5
reported, paired bootstrap intervals of each difference to LoRA r=8 (lime_examples/bench/paired_stats.py).

Writes benchmarks/results/separation.md, separation.json and separation_runs.jsonl (per-run, per-example
predictions: one string of predicted labels per task, in the split's item order).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import peft_lime
from lime_examples.bench.digit_tasks import DigitSuite, majority_baseline
from lime_examples.bench.machine import git_commit
from lime_examples.bench.paired_stats import choose_lr, grid_edge, widen
from lime_examples.bench.quality_common import RunLog
from lime_examples.bench.separation_ablation import ablation_markdown, ablation_pairs, ablation_rows, ablation_verdict
from lime_examples.bench.separation_report import fmt_lr, to_markdown
from lime_examples.bench.separation_summary import (
    LIME_GLOBAL,
    LIME_MICRO,
    PER_TASK,
    REFERENCE,
    correct_matrix,
    gold_strings,
    same_lr_check,
    summarise,
    verdict,
)
from lime_examples.bench.separation_train import (
    Config,
    Row,
    load_base,
    matched_rank,
    run_once,
    trainable_count,
    untrained_routing,
)

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("separation")

TASKS = ("last_mod3", "first_mod3", "first_vs_last", "sevens_parity")


def has_balance_scope() -> bool:
    return "balance_scope" in peft_lime.LimeConfig.__dataclass_fields__


def make_rows(base: torch.nn.Module, num_tasks: int) -> tuple[list[Row], list[str]]:
    """The rows (matched ranks computed on the backbone) and the rows that cannot run here, with the reason."""
    scoped = has_balance_scope()
    micro = Row(LIME_MICRO, "lime", lime={"balance_scope": "micro_batch"} if scoped else {})
    lime_count = trainable_count(micro, base, num_tasks)
    r_lora = matched_rank("lora", lime_count, base, num_tasks)
    r_molora = matched_rank("molora", lime_count, base, num_tasks)
    rows = [
        Row(REFERENCE, "lora"),
        Row(f"LoRA r={r_lora} (params of LiME E=8)", "lora", rank=r_lora),
        micro,
    ]
    skipped = []
    if scoped:
        rows.append(Row(LIME_GLOBAL, "lime", lime={"balance_scope": "global"}))
    else:
        skipped.append(f"{LIME_GLOBAL} (this peft_lime has no LimeConfig.balance_scope)")
    rows += [
        Row(f"MoLoRA-style E=8 top-2 r={r_molora} (params of LiME E=8)", "molora", rank=r_molora),
        Row(PER_TASK, "per_task"),
    ]
    return rows, skipped


def search_lr(row: Row, args: argparse.Namespace, run: Any, val_gold: list[str]) -> dict[str, Any]:
    """Grid search with the search seed on validation, widened at an edge (module docstring of paired_stats)."""
    grid, correct, widened = list(args.lrs), {}, []
    while True:
        for lr in grid:
            if lr not in correct:
                correct[lr] = int(
                    correct_matrix([run(row, lr, args.search_seed, ("validation",))], val_gold, "validation").sum()
                )
        chosen = choose_lr(correct)
        side = grid_edge(chosen, grid)
        if side is None:
            break
        if len(widened) >= args.max_widen:
            widened.append(f"still at the {side} edge after {args.max_widen} widenings")
            logger.warning("%s: lr %s still at the %s edge of %s", row.name, fmt_lr(chosen), side, grid)
            break
        new = widen(grid, side)
        widened.append(f"{side}: + {fmt_lr(new)}")
        logger.info(
            "%s: chosen lr %s at the %s edge; widening the grid with %s", row.name, fmt_lr(chosen), side, fmt_lr(new)
        )
        grid = sorted(grid + [new])
    return {"grid": grid, "correct": {str(k): v for k, v in correct.items()}, "chosen": chosen, "widened": widened}


def machine() -> dict[str, Any]:
    import peft
    import transformers

    commit = git_commit(ROOT)
    commit = f"commit {commit.removesuffix('-dirty')}" + (" + uncommitted changes" if commit.endswith("-dirty") else "")
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_lime": peft_lime.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, tiny splits, 1 reporting seed")
    p.add_argument("--render", action="store_true", help="only rewrite separation.md from separation.json in --out")
    p.add_argument(
        "--ablation", action="store_true", help="routing ablation rows instead (separation_ablation.md / .json / runs)"
    )
    p.add_argument(
        "--resume", action="store_true", help="reuse the runs of separation_runs.jsonl made with this protocol"
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--num_digits", type=int, default=5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--val_per_task", type=int, default=250)
    p.add_argument("--test_per_task", type=int, default=500)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--max_widen", type=int, default=2, help="grid widenings per row when the choice is at an edge")
    p.add_argument("--search_seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--rows", nargs="*", default=None, help="run only the rows whose names start with these strings")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads (use 1 when another job shares a 2-core machine)"
    )
    p.add_argument(
        "--no_same_lr_check",
        dest="same_lr_check",
        action="store_false",
        help="skip the extra runs that compare the two LiME rows at each other's chosen lr",
    )
    p.add_argument("--note", default="", help="a remark on the machine or the run, printed in the report")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.micro_batch, args.val_per_task, args.test_per_task = 2, 4, 8, 8
        args.seeds, args.max_widen, args.bootstrap = args.seeds[:2], 1, 200
    if args.search_seed in args.seeds:
        p.error("--seeds must not contain --search_seed: the lr-search seed is never reported")
    return args


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """Everything besides (row, lr, seed) that decides a run's result."""
    keys = ("tasks", "num_digits", "steps", "micro_batch", "val_per_task", "test_per_task", "data_seed")
    return {k: getattr(args, k) for k in keys}


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'row':58s} {'trainable':>10s} {'lr':>7s} {'macro [95% CI]':>24s} {'vs LoRA r=8 (points)':>24s}")
    for name, s in summary.items():
        diff = (
            "reference"
            if s["vs_reference"] is None
            else "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * x for x in s["vs_reference"]))
        )
        macro = "{:.3f} [{:.3f}, {:.3f}]".format(*s["macro"])
        print(f"{name:58s} {s['trainable']:>10,} {fmt_lr(s['lr']):>7s} {macro:>24s} {diff:>24s}")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    stem = "separation_ablation" if args.ablation else "separation"
    if args.render:  # derived parts only (verdict, markdown); the measurements are read back unchanged
        path = Path(args.out) / f"{stem}.json"
        result = json.loads(path.read_text())
        if args.note:
            result["args"]["note"] = args.note
        untrained = result["untrained_routing"].get("mutual_information")
        result["verdict"] = (
            ablation_verdict(result["summary"], result["pairs"])
            if args.ablation
            else verdict(result["summary"], result["pairs"], untrained, len(result["tasks"]), result.get("same_lr"))
        )
        path.write_text(json.dumps(result, indent=1))
        (Path(args.out) / f"{stem}.md").write_text((ablation_markdown if args.ablation else to_markdown)(result))
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from lime_examples.assets import minilm_dir

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = DigitSuite(args.tasks, args.num_digits, args.val_per_task, args.test_per_task, args.data_seed)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    base = load_base(len(suite.labels))
    rows, skipped = (ablation_rows(len(suite.tasks)), []) if args.ablation else make_rows(base, len(suite.tasks))
    if args.rows:
        rows = [r for r in rows if r.name == REFERENCE or any(r.name.startswith(s) for s in args.rows)]
    cfg = Config(steps=args.steps, micro_batch=args.micro_batch, threads=args.threads)
    log = RunLog(out / f"{stem}_runs.jsonl", protocol(args), resume=args.resume)
    reused = len(log.finished)
    by_name = {r.name: r for r in rows}
    trained = [0]
    used: dict[tuple[str, float, int], float] = {}  # wall seconds of every run this report uses

    def run(row: Row, lr: float, seed: int, splits: tuple[str, ...]) -> dict[str, Any]:
        def train() -> dict[str, Any]:
            t0 = time.perf_counter()
            trained[0] += 1
            result = run_once(row, base, suite, tok, lr, seed, cfg, splits)
            logger.info("%s lr=%s seed=%d: %.0f s", row.name, fmt_lr(lr), seed, time.perf_counter() - t0)
            return dict(result, wall_s=time.perf_counter() - t0)

        result = log.get(row.name, lr, seed, train)
        used[(row.name, lr, seed)] = result.get("wall_s", 0.0)
        return result

    val_gold = gold_strings(suite, "validation")
    searches, runs, chosen = {}, {}, {}
    for row in rows:
        searches[row.name] = search_lr(row, args, run, val_gold)
        chosen[row.name] = searches[row.name]["chosen"]
        runs[row.name] = [run(row, chosen[row.name], seed, ("test",)) for seed in args.seeds]
    lime_rows = [r for r in rows if r.kind == "lime"]
    untrained = untrained_routing(lime_rows[0], base, suite, tok) if lime_rows else {}
    summary, pairs = summarise(rows, runs, chosen, suite, args, wanted=ablation_pairs() if args.ablation else None)
    same_lr = same_lr_check(lime_rows, chosen, run, suite, args) if args.same_lr_check and not args.ablation else []
    result = {
        "command": shlex.join(["python", "benchmarks/separation.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "protocol": protocol(args),
        "machine": machine(),
        "tasks": [
            {"name": t.name, "word": t.word, "labels": list(t.labels), "description": t.description, "majority": m}
            for t, m in zip(suite.tasks, majority_baseline(suite.test, len(suite.tasks)))
        ],
        "example_input": suite.test[0].text,
        "val_items": len(suite.validation),
        "rows": {r.name: {"kind": r.kind, "rank": r.rank, "lime": r.lime} for r in by_name.values()},
        "skipped_rows": skipped,
        "lr_search": searches,
        "summary": summary,
        "pairs": pairs,
        "same_lr": same_lr,
        "untrained_routing": untrained,
        "verdict": ablation_verdict(summary, pairs)
        if args.ablation
        else verdict(summary, pairs, untrained.get("mutual_information"), len(suite.tasks), same_lr),
        "reused_runs": reused,
        "new_runs": trained[0],
        "seconds": time.perf_counter() - t_start,
        "run_seconds": sum(used.values()),
        "runs_used": len(used),
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text((ablation_markdown if args.ablation else to_markdown)(result))
    print_table(summary)
    logger.info("wrote %s (%.1f min)", out / f"{stem}.md", result["seconds"] / 60)
    return result


if __name__ == "__main__":
    main()
