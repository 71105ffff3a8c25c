"""Checks of a LiME checkpoint against the model it is loaded into.

PEFT loads adapter weights with ``strict=False`` and only warns about missing keys in some paths: an adapter whose
config says ``shared_expert=False`` while its weights hold the shared vector (or the reverse, or another number of
layers) would load with randomly initialised or ignored expert tensors. LiME's own tensors are checked exactly.
PEFT's warning about missing keys only looks at keys with the tuner's prefix ("lime_"), so the base tuner's missing
tensors (lora_B, ...) are warned about here, in PEFT's words. A NaN or inf in any tensor is refused: routing turns
a corrupted expert or adapter into finite, wrong outputs instead of NaNs that would show.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

EXPERTS_SEGMENT = ".lime_experts."
PEFT_PREFIX = "base_model.model."


def check_checkpoint(model: Any, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Every check of a checkpoint of ``adapter_name`` (keys remapped to the model's names) against ``model``."""
    check_finite(adapter_name, state_dict)
    check_lime_keys(model, config, adapter_name, state_dict)
    warn_missing_base_keys(model, config, adapter_name, state_dict)


def check_finite(adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """ValueError naming the tensors of the checkpoint that hold NaN or inf."""
    bad = [
        key
        for key, value in state_dict.items()
        if torch.is_tensor(value) and value.is_floating_point() and not value.is_meta and not value.isfinite().all()
    ]
    if bad:
        raise ValueError(
            f"LiME adapter '{adapter_name}': NaN or inf in {_shown(bad)}; the checkpoint is corrupted and is not "
            "loaded (LiME's routing can turn such values into finite, wrong outputs instead of NaNs that would show)"
        )


def warn_missing_base_keys(model: Any, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Warn, as PEFT does for its own tuners, when base-tuner tensors of ``adapter_name`` are not in the checkpoint:
    they keep their fresh initialisation (lora_B = 0: the adapter does nothing)."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.base.peft_type)
    if not prefix:
        return
    expected = {
        k
        for k in model.state_dict()
        if prefix in k and EXPERTS_SEGMENT not in k and (f".{adapter_name}." in k or k.endswith(f".{adapter_name}"))
    }
    missing = sorted(expected - _given_keys(expected, state_dict))
    if missing:
        # PEFT's wording (peft_model.py), which users and tests search for
        warnings.warn(
            f"LiME adapter '{adapter_name}': Found missing adapter keys while loading the checkpoint: {missing}. "
            "These tensors of the base tuner keep their fresh initialisation.",
            stacklevel=2,
        )


def _given_keys(expected: set[str], state_dict: dict[str, torch.Tensor]) -> set[str]:
    # Without a PeftModel around the layers (inject_adapter_in_model) the model keys carry no prefix.
    if expected and not any(k.startswith(PEFT_PREFIX) for k in expected):
        return {k.removeprefix(PEFT_PREFIX) for k in state_dict}
    return set(state_dict)


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def check_lime_keys(model: Any, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ValueError when the checkpoint's expert tensors of ``adapter_name`` differ from the model's.

    ``state_dict`` holds the checkpoint keys already remapped to the model's names (adapter name inserted); keys the
    model does not have pass the remapping unchanged, so every expert key of the checkpoint is compared.
    """
    expected = {k for k in model.state_dict() if f"{EXPERTS_SEGMENT}{adapter_name}." in k}
    given = {k for k in _given_keys(expected, state_dict) if EXPERTS_SEGMENT in k}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if not (missing or unexpected):
        return
    hint = ""
    if any(k.endswith((".shared", ".gate")) for k in missing + unexpected):
        hint = (
            f" The config says shared_expert={config.shared_expert}, the weights say otherwise: the adapter_config.json "
            "and the weights file do not belong together."
        )
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_shown(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_shown(unexpected)}")
    raise ValueError(f"LiME adapter '{adapter_name}': expert tensors {'; '.join(parts)}.{hint}")
