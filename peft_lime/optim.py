"""Optimizer with its own learning rate and weight decay for LiME's expert vectors, for any trainer.

Trainer and TRL's SFTTrainer accept a ready optimizer (``optimizers=(optimizer, None)``) or
``optimizer_cls_and_kwargs=(cls, kwargs)`` with ``kwargs["params"]`` holding parameter groups; both keep the
Trainer's learning-rate scheduler, which scales every group's ``lr`` by the same factor. No subclassing needed.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

EXPERT_KEY = "lime_experts"


def lime_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    expert_lr: Optional[float] = None,
    expert_weight_decay: Optional[float] = None,
) -> list[dict[str, Any]]:
    """Parameter groups: trainable non-expert parameters (decayed / not decayed) and the expert vectors.

    Expert vectors are the parameters under ``lime_experts`` (expert matrix, shared vector and gate). Like
    Trainer's default grouping, biases and norm weights get no weight decay. Empty groups are left out.
    ``expert_lr`` / ``expert_weight_decay`` default to ``lr`` / 0.0: expert weights store the deviation from 1,
    so weight decay pulls every expert towards the plain adapter (useful as a regulariser, off by default).
    """
    from transformers.trainer_pt_utils import get_parameter_names

    # Same rule as Trainer.get_decay_parameter_names.
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay_names = set(get_parameter_names(model, [nn.LayerNorm], patterns))
    experts, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if f"{EXPERT_KEY}." in name:
            experts.append(param)
        elif name in decay_names:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "adapter"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "adapter_no_decay"},
        {
            "params": experts,
            "lr": lr if expert_lr is None else expert_lr,
            "weight_decay": 0.0 if expert_weight_decay is None else expert_weight_decay,
            "name": "lime_experts",
        },
    ]
    return [g for g in groups if g["params"]]


def lime_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    expert_lr: Optional[float] = None,
    expert_weight_decay: Optional[float] = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer (AdamW by default) over :func:`lime_param_groups`.

    Pass it to ``Trainer(..., optimizers=(lime_optimizer(model, ...), None))``; with ``SFTTrainer(peft_config=...)``
    the LiME model only exists after the trainer is built, so use ``get_peft_model`` first and pass the PeftModel.

    Example:
        ```py
        >>> opt = peft_lime.lime_optimizer(peft_model, lr=2e-4, expert_lr=1e-3, expert_weight_decay=0.0)
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, optimizers=(opt, None))
        ```
    """
    groups = lime_param_groups(model, lr, weight_decay, expert_lr, expert_weight_decay)
    if not groups:
        raise ValueError("model: no trainable parameters")
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
