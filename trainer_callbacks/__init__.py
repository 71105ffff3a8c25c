"""Trainer callbacks for LiME routing telemetry (transformers' Trainer and TRL's trainers)."""

from .console import CONSOLE_MODES
from .lime_routing import LimeRoutingCallback

__all__ = ["CONSOLE_MODES", "LimeRoutingCallback"]
