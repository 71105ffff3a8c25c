"""The folds behind export.py: one LiME layer under a fixed modulation vector m as a plain adapter of its base tuner.

Each fold takes the layer's saved base-tuner tensors (keys as PEFT saves them after the layer name), m, the base
config, the layer name and (DoRA only) the frozen weight, and returns the tensors of the equivalent plain adapter.
The math of each is in export.py's module docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

Fold = Callable[[dict[str, torch.Tensor], torch.Tensor, Any, str, Optional[torch.Tensor]], dict[str, torch.Tensor]]


def _rows(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (t.float() * m.reshape(-1, *([1] * (t.dim() - 1)))).to(t.dtype)


def _fold_dora(
    tensors: dict[str, torch.Tensor], m: torch.Tensor, config: Any, layer: str, weight: Optional[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """DoRA adds (r - 1) * W x + r * s B A x with r = magnitude / ||W + s B A|| (per output row). Times m, that is a
    DoRA with r' = 1 + m (r - 1), B' = diag(m r / r') B and magnitude' = r' ||W + s B' A||."""
    if weight is None:
        raise ValueError(
            f"{layer}: DoRA's fold needs the base layer's weight (its row norms): use export_static(model, ...) with "
            "the model loaded (the command line works from the adapter directory alone)"
        )
    A, B, magnitude = (tensors[k].double() for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    scaling = _lora_scaling(config, layer, A.shape[0])
    W = weight.double()
    r = magnitude / torch.linalg.norm(W + scaling * (B @ A), dim=1)
    r_new = 1.0 + m.double() * (r - 1.0)
    if (r_new.abs() < 1e-6).any():
        raise ValueError(f"{layer}: this routing profile zeroes a DoRA row scale (1 + m (r - 1) = 0); no DoRA form")
    B_new = B * (m.double() * r / r_new)[:, None]
    out = dict(tensors)
    out["lora_B.weight"] = B_new.to(tensors["lora_B.weight"].dtype)
    norm_new = torch.linalg.norm(W + scaling * (B_new @ A), dim=1)
    out["lora_magnitude_vector"] = (r_new * norm_new).to(tensors["lora_magnitude_vector"].dtype)
    return out


def _lora_scaling(config: Any, layer: str, rank: int) -> float:
    """PEFT's LoRA scaling of one layer: lora_alpha (or its alpha_pattern entry) / r, or / sqrt(r) for rsLoRA."""
    from peft.utils.other import get_pattern_key

    alpha = config.lora_alpha
    if config.alpha_pattern:
        key = get_pattern_key(config.alpha_pattern.keys(), layer)
        alpha = config.alpha_pattern.get(key, alpha)
    return alpha / rank**0.5 if config.use_rslora else alpha / rank


def _fold_lora(
    tensors: dict[str, torch.Tensor], m: torch.Tensor, config: Any, layer: str, weight: Optional[torch.Tensor]
) -> dict[str, torch.Tensor]:
    if "lora_magnitude_vector" in tensors:
        if "lora_B.bias" in tensors:
            raise ValueError(f"{layer}: DoRA with lora_bias is not exported")
        return _fold_dora(tensors, m, config, layer, weight)
    if "lora_B.weight" not in tensors or set(tensors) - {"lora_A.weight", "lora_B.weight", "lora_B.bias"}:
        raise ValueError(f"{layer}: unexpected LoRA tensors {sorted(tensors)} (only linear LoRA layers are exported)")
    out = dict(tensors)
    out["lora_B.weight"] = _rows(tensors["lora_B.weight"], m)
    if "lora_B.bias" in tensors:
        out["lora_B.bias"] = _rows(tensors["lora_B.bias"], m)
    return out


def _fold_ia3(
    tensors: dict[str, torch.Tensor], m: torch.Tensor, config: Any, layer: str, weight: Optional[torch.Tensor]
) -> dict[str, torch.Tensor]:
    from peft.tuners.ia3.model import IA3Model

    if IA3Model._check_target_module_feedforward(config, layer):
        raise ValueError(
            f"{layer}: IA3 on a feed-forward module scales the layer's INPUT; an output-channel modulation has no "
            "exact IA3 form there. Export needs IA3 without feedforward_modules on the LiME-wrapped layers"
        )
    scale = tensors["ia3_l"]
    return {"ia3_l": (1.0 + m.reshape(scale.shape) * (scale.float() - 1.0)).to(scale.dtype)}


def _fold_loha(
    tensors: dict[str, torch.Tensor], m: torch.Tensor, config: Any, layer: str, weight: Optional[torch.Tensor]
) -> dict[str, torch.Tensor]:
    if any(k.startswith("hada_t") for k in tensors):
        raise ValueError(f"{layer}: LoHa with Tucker factors (convolutions) is not exported")
    out = dict(tensors)
    out["hada_w1_a"] = _rows(tensors["hada_w1_a"], m)
    return out


def _refuse_lokr(
    tensors: dict[str, torch.Tensor], m: torch.Tensor, config: Any, layer: str, weight: Optional[torch.Tensor]
) -> dict[str, torch.Tensor]:
    raise ValueError(
        "LoKr: its update is a Kronecker product kron(W1, W2); scaling its output rows by a general vector does not "
        "keep that form, so no LoKr adapter reproduces static-routing LiME. Use LoRA, IA3 or LoHa as the base to export"
    )


FOLDS: dict[str, Fold] = {"LORA": _fold_lora, "IA3": _fold_ia3, "LOHA": _fold_loha, "LOKR": _refuse_lokr}
