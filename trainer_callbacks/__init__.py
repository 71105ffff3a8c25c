"""Trainer callbacks for LiME routing telemetry."""
