"""Make LIME a PEFT method: entries in PEFT's method registry for LimeConfig and LimeModel.

Released PEFT (0.21) only registers names that are already members of the ``PeftType`` enum (see peft_type.py) and
has no plugin discovery. A PEFT that carries the changes in ``upstream_patches/`` imports ``peft_lime`` through the
``peft.methods`` entry point when it meets an unknown ``peft_type``.
"""

from __future__ import annotations

import logging

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .config import LimeConfig
from .model import LimeModel
from .peft_type import LIME_NAME, LIME_PREFIX, ensure_lime_peft_type

logger = logging.getLogger(__name__)


def register_lime() -> None:
    """Register LimeConfig / LimeModel with PEFT's method registry (idempotent)."""
    peft_type = ensure_lime_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is LimeConfig:
        return
    register_peft_method(name=LIME_NAME.lower(), config_cls=LimeConfig, model_cls=LimeModel, prefix=LIME_PREFIX)
    logger.debug("registered PeftType.LIME with PEFT")
