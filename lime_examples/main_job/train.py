"""Training for the main job: adapter configs, a task-balanced training set, one transformers Trainer run."""

from __future__ import annotations

import importlib.util
import logging
import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ..mini_mmt.data import Example
from ..mini_mmt.vlm import MiniVLM, PatchProjector, ProjectorConfig, PromptEncoder, TrainCollator, embedding_rms

logger = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
METHODS = ("lime", "lora")


def adapter_config(
    method: str, rank: int, num_experts: int, targets: Sequence[str] = TARGETS, **lime_kwargs: Any
) -> Any:
    """LiME over LoRA, or the plain PEFT LoRA it is compared with (same rank, alpha = 2 r, targets).
    ``lime_kwargs``: further LimeConfig fields (ablations), for method "lime" only."""
    from peft import LoraConfig

    import peft_lime

    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if lime_kwargs and method != "lime":
        raise ValueError(f"lime_kwargs: LimeConfig fields {sorted(lime_kwargs)} given for method {method!r}")
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets))
    return peft_lime.LimeConfig(base=lora, num_experts=num_experts, **lime_kwargs) if method == "lime" else lora


def initial_projector(config: ProjectorConfig, lm: torch.nn.Module, seed: int) -> PatchProjector:
    """The patch projector every method of seed ``seed`` starts from: drawn right after ``torch.manual_seed(seed)``,
    on the device of ``lm`` (whose embedding RMS sets its output scale)."""
    torch.manual_seed(seed)
    device = next(lm.parameters()).device
    return PatchProjector(config, embed_rms=embedding_rms(lm)).to(device)


def wrap_with_adapter(lm: torch.nn.Module, config: Any, seed: int) -> torch.nn.Module:
    """``get_peft_model(lm, config)`` right after ``torch.manual_seed(seed)``: the base adapter's tensors (LoRA's A
    and B) are drawn in the same order whether ``config`` is a LoraConfig or a LimeConfig over it, so LoRA and LiME
    of one seed start from bitwise identical adapter weights, whatever consumed the global RNG before (building a
    base model, earlier runs). LiME's expert vectors come from their own per-layer generator
    (peft_lime.experts.expert_seed) and draw nothing from the global RNG."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(lm, config)


def balanced_train_set(examples: Sequence[Example], per_task: int, seed: int) -> list[Example]:
    """Every task contributes ``per_task`` examples: its own, cycled when it has fewer (small tables), so the
    shuffled batches mix the tasks in equal shares whatever the size of their sources."""
    by_task: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    rng = random.Random(seed)
    out: list[Example] = []
    for task in sorted(by_task):
        own = list(by_task[task])
        reps = []
        while len(reps) < per_task:
            rng.shuffle(own)
            reps.extend(own[: per_task - len(reps)])
        out.extend(reps)
    return out


def _optimizer(
    vlm: MiniVLM, lr: float, projector_lr: float, expert_lr: Optional[float] = None
) -> torch.optim.Optimizer:
    """AdamW over the adapter (at ``lr``; LiME's expert vectors at ``expert_lr`` when given, through
    peft_lime.lime_param_groups) and the projector (at ``projector_lr``), no weight decay."""
    if expert_lr is None:
        groups = [{"params": [p for p in vlm.lm.parameters() if p.requires_grad], "lr": lr, "weight_decay": 0.0}]
    else:
        import peft_lime

        groups = peft_lime.lime_param_groups(vlm.lm, lr, expert_lr=expert_lr)
    groups.append({"params": list(vlm.projector.parameters()), "lr": projector_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.99))


def train(
    vlm: MiniVLM,
    enc: PromptEncoder,
    train_set: Sequence[Example],
    task_names: Mapping[int, str],
    settings: Mapping[str, Any],
    out_dir: Path,
    use_gpu: bool,
    console: str = "compact",
) -> dict[str, Any]:
    """Fine-tune the adapter and the projector with transformers' Trainer (shuffled, task-mixed batches; linear
    warm-up then cosine decay, gradient clipping at 1.0). ``settings``: max_steps, batch_size, lr, projector_lr,
    warmup_ratio, logging_steps, seed, and optionally expert_lr (LiME's expert vectors). Returns steps, loss, seconds
    and the log history (with the LiME routing keys when the model has LiME)."""
    from transformers import Trainer, TrainingArguments

    import peft_lime
    from trainer_callbacks import LimeRoutingCallback

    try:
        peft_lime.find_lime_model(vlm.lm)
        has_lime = True
    except ValueError:  # the plain LoRA of --compare lora
        has_lime = False
    callbacks = [LimeRoutingCallback(task_names=dict(task_names), console=console)] if has_lime else []
    report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    targs = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=settings["max_steps"],
        per_device_train_batch_size=settings["batch_size"],
        learning_rate=settings["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(settings["warmup_ratio"] * settings["max_steps"])),
        logging_steps=settings["logging_steps"],
        save_strategy="no",
        report_to=report_to,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not use_gpu,
        bf16=use_gpu,
        seed=settings["seed"],
        max_grad_norm=1.0,
        disable_tqdm=False,  # the default follows the transformers logger, which the demo quiets
    )
    trainer = Trainer(
        model=vlm,
        args=targs,
        train_dataset=list(train_set),
        data_collator=TrainCollator(enc, vlm.projector.config.image_size, padding_side="left"),
        optimizers=(_optimizer(vlm, settings["lr"], settings["projector_lr"], settings.get("expert_lr")), None),
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
        "examples_seen": result.global_step * settings["batch_size"],
        "report_to": report_to,
        "log_history": [h for h in trainer.state.log_history if "loss" in h],
    }
