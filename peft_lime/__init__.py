"""peft-lime: LiME (Lightweight Mixture of Experts) as a native PEFT tuner.

``import peft_lime`` registers ``PeftType.LIME`` with PEFT (idempotently). It must happen before
``PeftModel.from_pretrained`` loads a LiME adapter: released PEFT has no plugin discovery and otherwise fails with
``KeyError: 'LIME'``.
"""

from .config import LimeConfig
from .deltas import register_delta
from .layer import LimeExperts, LimeLayer
from .model import LimeModel, enable_task_ids, find_lime_model
from .registration import ensure_lime_peft_type, register_lime
from .telemetry import get_aux_loss, get_routing_stats, reset_routing_stats, set_aux_loss_scale

register_lime()

__version__ = "0.1.0"
__all__ = [
    "LimeConfig",
    "LimeExperts",
    "LimeLayer",
    "LimeModel",
    "enable_task_ids",
    "ensure_lime_peft_type",
    "find_lime_model",
    "get_aux_loss",
    "get_routing_stats",
    "register_delta",
    "register_lime",
    "reset_routing_stats",
    "set_aux_loss_scale",
]
