"""Checks of a LiME checkpoint against the model it is loaded into.

PEFT loads adapter weights with ``strict=False`` and only warns about missing keys in some paths: an adapter whose
config says ``shared_expert=False`` while its weights hold the shared vector (or the reverse, or another number of
layers) would load with randomly initialised or ignored expert tensors. LiME's own tensors are checked exactly.
"""

from __future__ import annotations

from typing import Any

import torch

EXPERTS_SEGMENT = ".lime_experts."


def check_lime_keys(model: Any, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ValueError when the checkpoint's expert tensors of ``adapter_name`` differ from the model's.

    ``state_dict`` holds the checkpoint keys already remapped to the model's names (adapter name inserted); keys the
    model does not have pass the remapping unchanged, so every expert key of the checkpoint is compared.
    """
    expected = {k for k in model.state_dict() if f"{EXPERTS_SEGMENT}{adapter_name}." in k}
    given = {k for k in state_dict if EXPERTS_SEGMENT in k}
    prefix = "base_model.model."
    # Without a PeftModel around the layers (inject_adapter_in_model) the model keys carry no prefix.
    if expected and not any(k.startswith(prefix) for k in expected):
        given = {k.removeprefix(prefix) for k in given}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if not (missing or unexpected):
        return
    hint = ""
    if any(k.endswith((".shared", ".gate")) for k in missing + unexpected):
        hint = (
            f" The config says shared_expert={config.shared_expert}, the weights say otherwise: the adapter_config.json "
            "and the weights file do not belong together."
        )
    shown = lambda keys: ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")  # noqa: E731
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {shown(missing)}")
    if unexpected:
        parts.append(f"not in the model: {shown(unexpected)}")
    raise ValueError(f"LiME adapter '{adapter_name}': expert tensors {'; '.join(parts)}.{hint}")
