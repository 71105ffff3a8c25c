"""The PeftType member LIME (a lower module: config and model need it, registration needs them).

Released PEFT (0.21) only registers names that are already members of the ``PeftType`` enum, and has no plugin
discovery. A PEFT that carries the changes in ``upstream_patches/`` grows the enum itself (``add_peft_type``) and
imports ``peft_lime`` through the ``peft.methods`` entry point when it meets an unknown ``peft_type``; on such a PEFT
the supported path is used and the enum extension below is never needed.
"""

from __future__ import annotations

import json
import logging
import pickle

from peft.utils import PeftType

logger = logging.getLogger(__name__)

LIME_NAME = "LIME"
LIME_PREFIX = "lime_"


def _extend_peft_type_enum() -> None:
    """Add LIME to PeftType the way Enum itself creates members, so every lookup path knows it."""
    member = str.__new__(PeftType, LIME_NAME)
    member._name_ = LIME_NAME
    member._value_ = LIME_NAME
    member.__objclass__ = PeftType
    member.__init__(LIME_NAME)
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[LIME_NAME] = member
    PeftType._value2member_map_[LIME_NAME] = member
    PeftType._member_names_.append(LIME_NAME)
    # Members are class attributes; EnumType.__setattr__ refuses to rebind members, so go through type.
    type.__setattr__(PeftType, LIME_NAME, member)


def _verify_peft_type() -> None:
    member = PeftType(LIME_NAME)
    problems = []
    if PeftType[LIME_NAME] is not member or getattr(PeftType, LIME_NAME) is not member:
        problems.append("name lookup")
    if member not in list(PeftType):
        problems.append("iteration")
    if pickle.loads(pickle.dumps(member)) is not member:
        problems.append("pickling")
    if json.dumps(member) != f'"{LIME_NAME}"' or member.value != LIME_NAME:
        problems.append("JSON")
    if problems:
        raise RuntimeError(f"peft_lime could not register PeftType.LIME with this PEFT ({', '.join(problems)} failed)")


def ensure_lime_peft_type() -> PeftType:
    """Idempotently make ``PeftType.LIME`` exist; returns the member."""
    if LIME_NAME not in PeftType._value2member_map_:
        from peft.utils import peft_types

        add_peft_type = getattr(peft_types, "add_peft_type", None)
        if add_peft_type is not None:  # patched / future PEFT: the supported way
            add_peft_type(LIME_NAME)
        else:  # released PEFT: extend the enum at import time
            _extend_peft_type_enum()
        _verify_peft_type()
    return PeftType(LIME_NAME)
