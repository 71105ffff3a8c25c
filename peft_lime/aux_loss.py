"""The load-balancing aux loss seen from the model: its last value and the scale of its injected gradient."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .model import find_lime_model
from .telemetry import lime_layers


def get_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The load-balancing aux loss of the last training forward (detached), summed over layers; None if none.

    With ``balance_scope="global"`` it is the global term: the balance of the accumulation window so far over all
    data-parallel ranks (on the last micro-batch of a window, the whole global batch's).
    """
    total = None
    for _, layer in lime_layers(model):
        for adapter in layer.active_adapters:
            stats = layer.lime_stats.get(adapter)
            if stats is not None and stats.last_aux is not None:
                total = stats.last_aux if total is None else total + stats.last_aux
    return total


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale of the injected aux-loss gradient; set it to 1 / gradient_accumulation_steps (the callbacks do)."""
    find_lime_model(model).routing_context.aux_loss_scale = float(scale)
