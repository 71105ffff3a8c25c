"""Trainer callbacks for LiME routing telemetry (transformers' Trainer and TRL's trainers)."""

from .lime_routing import LimeRoutingCallback

__all__ = ["LimeRoutingCallback"]
