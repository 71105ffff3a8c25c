"""Main job over seeds: does LiME beat LoRA on mini-MMT once training noise is measured?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/main_job_seeds.py             # full run (hours: see the README)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/main_job_seeds.py --quick     # smoke run (minutes; numbers meaningless)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/main_job_seeds.py --resume    # reuse finished runs of the same protocol

The main job (examples/demo.py: SmolLM2-135M + patch projector, mini-MMT, 180 steps) trains ONE run per method, so
its interval covers test-item sampling only. Here every row trains once per reporting seed (1-5), every row of a seed
starting from the same projector and LoRA weights (lime_examples/main_job/train.py: initial_projector,
wrap_with_adapter), at an lr chosen per row on the validation split with seed 0 (never reported); the report gives
per-row macro accuracy with a paired two-level bootstrap interval (seeds and test items resampled, the same draws for
every row), per-task means, the seed spread, paired differences to LoRA r=8 and of LiME E=8 to each other row, the
routing mutual information of the LiME rows and a verdict per difference that follows its interval.

Rows: LoRA r=8, LoRA at LiME E=8's trainable count, LiME E=8 (LimeConfig defaults), and LiME E=8 ablations (uniform
routing, oracle task routing, oracle learned task mix, the authors' balance schedule) when this peft_lime's LimeConfig
has their fields. Writes benchmarks/results/main_job_seeds.md, main_job_seeds.json and main_job_seeds_runs.jsonl
(one record per run, appended as it ends: per-task per-item correctness strings, trainable count, seconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lime_examples.bench.machine import git_commit  # noqa: E402
from lime_examples.bench.quality_common import RunLog  # noqa: E402
from lime_examples.bench.separation_report import fmt_lr  # noqa: E402
from lime_examples.main_job.run_info import machine_info  # noqa: E402
from lime_examples.main_job.seeds_report import to_markdown  # noqa: E402
from lime_examples.main_job.seeds_runs import (  # noqa: E402
    LIME,
    Job,
    Row,
    inherited_lr,
    is_ablation,
    make_rows,
    run_once,
    search_lr,
    select_rows,
)
from lime_examples.main_job.seeds_summary import recipe_stability, summarise, task_layout, verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("main_job_seeds")
NAME = "main_job_seeds"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line flags; --quick shrinks everything (the numbers then mean nothing)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, tiny splits, one lr, 2 seeds")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json in --out")
    p.add_argument("--resume", action="store_true", help="reuse the runs of the run log made with this protocol")
    p.add_argument("--rows", nargs="*", default=None, help="run only these rows: a full row name selects that row, "
                   "any other string the rows whose names start with it (LoRA r=8, the reference, always runs)")
    p.add_argument("--steps", type=int, default=180, help="optimizer steps per run (the main job's 180)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--train_cap", type=int, default=600, help="training examples per task")
    p.add_argument("--val_cap", type=int, default=100, help="validation examples per task (lr search)")
    p.add_argument("--test_cap", type=int, default=200, help="test examples per task")
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="share of the steps with linear warm-up")
    p.add_argument("--projector_lr_ratio", type=float, default=2.5, help="projector lr = this x the row's lr")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--max_widen", type=int, default=2, help="grid widenings per row when the choice is at an edge")
    p.add_argument("--search_seed", type=int, default=0)
    p.add_argument("--ablation_lr", choices=("search", "default"), default="search",
                   help="'default': the LiME ablation rows train at LiME E=8's chosen lr, without a search of their "
                   "own (an ablation then changes one thing against the default row, not the lr as well)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--logging_steps", type=int, default=1, help="steps per logged loss / gradient norm (1: step 1 too)")
    p.add_argument("--eval_batch_size", type=int, default=32)
    p.add_argument("--max_prompt_tokens", type=int, default=64)
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared 2-core machine)")
    p.add_argument("--note", default="", help="a remark on the machine or the run, printed in the report")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.train_cap, args.val_cap, args.test_cap = 2, 4, 8, 2, 4
        args.lrs, args.max_widen, args.seeds, args.bootstrap, args.logging_steps = args.lrs[1:2], 0, [1, 2], 200, 1
    if args.search_seed in args.seeds:
        p.error("--seeds must not contain --search_seed: the lr-search seed is never reported")
    if len(args.seeds) < 2 and not args.quick:
        logger.warning("one reporting seed: the intervals then cover test items only")
    return args


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """Everything besides (row, lr, seed) that decides a run's result."""
    keys = ("steps", "batch_size", "train_cap", "val_cap", "test_cap", "warmup_ratio", "projector_lr_ratio",
            "data_seed", "max_prompt_tokens", "patch_size", "eval_batch_size")
    return {k: getattr(args, k) for k in keys}


def machine(threads: int) -> dict[str, Any]:
    """machine_info() plus the commit, the date and the load average."""
    info = machine_info()
    commit = git_commit(ROOT)
    info["commit"] = f"commit {commit.removesuffix('-dirty')}" + (" + uncommitted changes" if commit.endswith(
        "-dirty") else "")
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["load_average"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return info


def build_job(args: argparse.Namespace, device: torch.device) -> Job:
    """The base LM (loaded once; every run gets a fresh copy), mini-MMT and the encoder."""
    from lime_examples.assets import load_causal_lm
    from lime_examples.mini_mmt import PromptEncoder, SplitCaps, load_mini_mmt
    from lime_examples.mini_mmt.vlm import ProjectorConfig

    base, tokenizer, _ = load_causal_lm(None, torch.float32)
    data = load_mini_mmt(caps=SplitCaps(train=args.train_cap, validation=args.val_cap, test=args.test_cap),
                         seed=args.data_seed)
    proj = ProjectorConfig(hidden_size=base.config.hidden_size, patch_size=args.patch_size)
    recipe = {"max_steps": args.steps, "batch_size": args.batch_size, "warmup_ratio": args.warmup_ratio,
              "projector_lr_ratio": args.projector_lr_ratio, "logging_steps": args.logging_steps,
              "train_cap": args.train_cap, "eval_batch_size": args.eval_batch_size}
    return Job(base.config, {k: v.detach().clone() for k, v in base.state_dict().items()}, data,
               PromptEncoder(tokenizer, proj.num_patches, max_prompt_tokens=args.max_prompt_tokens), proj, recipe,
               device)


def print_table(summary: dict[str, Any]) -> None:
    """The results table on the console."""
    print(f"{'row':40s} {'trainable':>10s} {'lr':>7s} {'macro [95% CI]':>24s} {'vs LoRA r=8 (points)':>24s}")
    for name, s in summary.items():
        diff = "reference" if s["vs_reference"] is None else "{:+.1f} [{:+.1f}, {:+.1f}]".format(
            *(100 * x for x in s["vs_reference"]))
        macro = "{:.3f} [{:.3f}, {:.3f}]".format(*s["macro"])
        print(f"{name:40s} {s['trainable']:>10,} {fmt_lr(s['lr']):>7s} {macro:>24s} {diff:>24s}")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run (or with --render, re-render) the benchmark; returns the results dict."""
    args = parse_args(argv)
    out = Path(args.out)
    if args.render:  # the verdict and the markdown are derived; the measurements are read back unchanged
        result = json.loads((out / f"{NAME}.json").read_text())
        result["verdict"] = verdict(result["summary"], result["pairs"], len(result["tasks"]))
        (out / f"{NAME}.json").write_text(json.dumps(result, indent=1))
        (out / f"{NAME}.md").write_text(to_markdown(result))
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    job = build_job(args, device)
    rows, skipped = make_rows(job.lm_config, len(job.data.tasks))
    rows = select_rows(rows, args.rows)
    if args.ablation_lr == "default" and any(is_ablation(r) for r in rows) and LIME not in {r.name for r in rows}:
        rows = select_rows(make_rows(job.lm_config, len(job.data.tasks))[0], [r.name for r in rows] + [LIME])
    log = RunLog(out / f"{NAME}_runs.jsonl", protocol(args), resume=args.resume)
    reused, trained, used = len(log.finished), [0], {}

    def run(row: Row, lr: float, seed: int, splits: tuple[str, ...]) -> dict[str, Any]:
        def fresh() -> dict[str, Any]:
            t0 = time.perf_counter()
            trained[0] += 1
            result = run_once(row, job, lr, seed, splits)
            logger.info("%s lr=%s seed=%d: %.0f s", row.name, fmt_lr(lr), seed, time.perf_counter() - t0)
            return dict(result, wall_s=time.perf_counter() - t0)

        result = log.get(row.name, lr, seed, fresh)
        used[(row.name, lr, seed)] = result.get("wall_s", 0.0)
        return result

    searches, runs, chosen = {}, {}, {}
    for row in rows:
        if args.ablation_lr == "default" and is_ablation(row):
            searches[row.name] = inherited_lr(searches[LIME], LIME)
        else:
            searches[row.name] = search_lr(row, args.lrs, args.max_widen, args.search_seed, run)
        chosen[row.name] = searches[row.name]["chosen"]
        runs[row.name] = [run(row, chosen[row.name], seed, ("test",)) for seed in args.seeds]
    summary, pairs = summarise(runs, chosen, args.bootstrap)
    names, sizes = task_layout([r for rs in runs.values() for r in rs])
    val_sizes = [sum(ex.task == n for ex in job.data.validation) for n in names]
    result = {
        "command": shlex.join(["python", "benchmarks/main_job_seeds.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "protocol": protocol(args),
        "machine": machine(args.threads),
        "device": str(device),
        "tasks": [{"name": n, "test_items": k, "val_items": v} for n, k, v in zip(names, sizes, val_sizes)],
        "rows": {r.name: {"method": r.method, "rank": r.rank, "lime": r.lime, "expert_lr_ratio": r.expert_lr_ratio}
                 for r in rows},
        "skipped_rows": skipped,
        "lr_search": searches,
        "summary": summary,
        "pairs": pairs,
        "stability": recipe_stability(runs),
        "verdict": verdict(summary, pairs, len(names)),
        "reused_runs": reused,
        "new_runs": trained[0],
        "seconds": time.perf_counter() - t_start,
        "run_seconds": sum(used.values()),
        "runs_used": len(used),
    }
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    (out / f"{NAME}.md").write_text(to_markdown(result))
    print_table(summary)
    logger.info("wrote %s (%.1f min)", out / f"{NAME}.md", result["seconds"] / 60)
    return result


if __name__ == "__main__":
    main()
