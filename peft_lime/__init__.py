"""peft-lime: LiME (Lightweight Mixture of Experts) as a native PEFT tuner.

``import peft_lime`` registers ``PeftType.LIME`` with PEFT (idempotently). It must happen before
``PeftModel.from_pretrained`` loads a LiME adapter: released PEFT has no plugin discovery and otherwise fails with
``KeyError: 'LIME'``.
"""

from . import (
    native_ops,  # noqa: F401  (registers the native kernels as custom ops, for compiled models)
    tuner_deltas,  # noqa: F401  (registers the extractors of PEFT's own tuners)
)
from .aux_loss import get_aux_loss, set_aux_loss_scale
from .balance import reset_balance_window
from .centroids import fit_routing_centroids
from .config import LimeConfig
from .data import TaskIdsCollator
from .deltas import DeltaExtractor, LowRankDelta, register_delta
from .experts import LimeExperts
from .export import export_static, export_static_from_pretrained
from .layer import LimeLayer
from .model import LimeModel, enable_task_ids, find_lime_model
from .model_card import enable_lime_model_card, install_model_card_hooks, update_lime_model_card
from .optim import lime_optimizer, lime_param_groups
from .peft_type import ensure_lime_peft_type
from .registration import register_lime
from .static_routing import (
    collect_routing_profiles,
    load_routing_profiles,
    recording_routing_profiles,
    save_routing_profiles,
    set_static_routing,
    static_routing,
)
from .telemetry import (
    get_routing_stats,
    recording_routing_stats,
    reset_routing_stats,
    set_routing_stats_enabled,
    set_routing_stats_mode,
    sync_routing_stats,
)

register_lime()

__version__ = "0.1.0"
__all__ = [
    "collect_routing_profiles",
    "DeltaExtractor",
    "enable_lime_model_card",
    "enable_task_ids",
    "ensure_lime_peft_type",
    "export_static",
    "export_static_from_pretrained",
    "find_lime_model",
    "fit_routing_centroids",
    "get_aux_loss",
    "get_routing_stats",
    "install_model_card_hooks",
    "lime_optimizer",
    "lime_param_groups",
    "LimeConfig",
    "LimeExperts",
    "LimeLayer",
    "LimeModel",
    "load_routing_profiles",
    "LowRankDelta",
    "recording_routing_profiles",
    "recording_routing_stats",
    "register_delta",
    "register_lime",
    "reset_balance_window",
    "reset_routing_stats",
    "save_routing_profiles",
    "set_aux_loss_scale",
    "set_routing_stats_enabled",
    "set_routing_stats_mode",
    "set_static_routing",
    "static_routing",
    "sync_routing_stats",
    "TaskIdsCollator",
    "update_lime_model_card",
]
