"""peft-lime: LiME (Lightweight Mixture of Experts) as a native PEFT tuner.

``import peft_lime`` registers ``PeftType.LIME`` with PEFT (idempotently). It must happen before
``PeftModel.from_pretrained`` loads a LiME adapter: released PEFT has no plugin discovery and otherwise fails with
``KeyError: 'LIME'``.
"""

from .config import LimeConfig
from .data import TaskIdsCollator
from .deltas import register_delta
from .layer import LimeExperts, LimeLayer
from .model import LimeModel, enable_task_ids, find_lime_model
from .model_card import install_model_card_hooks, update_lime_model_card
from .optim import lime_optimizer, lime_param_groups
from .registration import ensure_lime_peft_type, register_lime
from .telemetry import (
    get_aux_loss,
    get_routing_stats,
    reset_routing_stats,
    set_aux_loss_scale,
    set_routing_stats_enabled,
    sync_routing_stats,
)

register_lime()
install_model_card_hooks()

__version__ = "0.1.0"
__all__ = [
    "LimeConfig",
    "LimeExperts",
    "LimeLayer",
    "LimeModel",
    "TaskIdsCollator",
    "enable_task_ids",
    "ensure_lime_peft_type",
    "find_lime_model",
    "get_aux_loss",
    "get_routing_stats",
    "install_model_card_hooks",
    "lime_optimizer",
    "lime_param_groups",
    "register_delta",
    "register_lime",
    "reset_routing_stats",
    "set_aux_loss_scale",
    "set_routing_stats_enabled",
    "sync_routing_stats",
    "update_lime_model_card",
]
