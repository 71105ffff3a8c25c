"""Export a LiME adapter with static routing as plain adapters of its base tuner (servable, mergeable).

With the routing weights of a layer held fixed (static_routing.py), LiME's modulation is one vector m per layer and
the layer computes h + m * delta(x). For the tuners below that is exactly an adapter of the same type and size:
- LoRA / rsLoRA (also with lora_bias): m * (s B A x + s b) = s (diag(m) B) A x + s (m * b): scale B's rows (and bias);
- IA3 on outputs: h + m * h (l - 1) = h * (1 + m (l - 1)): a new scaling vector;
- LoHa: m * ((W1a W1b) o (W2a W2b)) x = ((diag(m) W1a) W1b) o (W2a W2b) x: scale W1a's rows.
- DoRA: a DoRA with new B and magnitude (see _fold_dora; needs the base weights, so the model, not the command line).
IA3 on inputs (feed-forward modules) and LoKr (a Kronecker product keeps no row scaling) are refused with an error.

    python -m peft_lime.export --adapter ADAPTER_DIR --routing profiles.safetensors --output-dir OUT

writes OUT/<profile>/ (adapter_config.json with the base tuner's peft_type, adapter_model.safetensors) for every
profile of the file: adapters that released PEFT loads without peft_lime and merges with merge_and_unload.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import LimeConfig
from .static_routing import load_routing_profiles

logger = logging.getLogger(__name__)

# Keys of the saved state dict: PeftModel prefix, then the layer name, then these.
MODEL_PREFIX = "base_model.model."
BASE_INFIX = ".base_layer."
EXPERTS_INFIX = ".lime_experts."
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


def modulation_vector(experts: Mapping[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """m = 1 + g * p_s + w @ (P - 1) in float32: LiME's modulation under fixed mixing weights w (see experts.py)."""
    deviation = experts["weight"].float()
    m = 1.0 + torch.as_tensor(weights, dtype=torch.float32) @ deviation
    if experts.get("shared") is not None:
        m = m + experts["gate"].float() * experts["shared"].float()
    return m


def export_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: LimeConfig,
    profile: Mapping[str, torch.Tensor],
    base_weights: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """The saved state dict of a LiME adapter (keys as PEFT saves them) folded into one of its base tuner.

    ``base_weights`` ({layer name: (out, in) frozen weight}) is needed by DoRA only."""
    peft_type = str(getattr(config.base.peft_type, "value", config.base.peft_type))
    fold = FOLDS.get(peft_type)
    if fold is None:
        raise ValueError(f"base: exporting LiME over {peft_type} is not supported (supported: {sorted(FOLDS)})")
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.match(rf"^{re.escape(MODEL_PREFIX)}(.+?)({re.escape(BASE_INFIX)}|{re.escape(EXPERTS_INFIX)})(.+)$", key)
        if match is None:
            out[key] = value  # modules_to_save, trainable tokens, ...: not routed, copied
            continue
        name, infix, suffix = match.groups()
        part = "base" if infix == BASE_INFIX else "experts"
        layers.setdefault(name, {"base": {}, "experts": {}})[part][suffix] = value
    missing, unknown = sorted(set(layers) - set(profile)), sorted(set(profile) - set(layers))
    if missing or unknown:
        raise ValueError(f"profile: layers missing {missing[:3]}, unknown {unknown[:3]} (measured on another model?)")
    for name, parts in layers.items():
        E = parts["experts"]["weight"].shape[0]
        weights = torch.as_tensor(profile[name], dtype=torch.float32).flatten()
        if weights.numel() != E or not torch.isfinite(weights).all():
            raise ValueError(f"profile[{name!r}]: expected {E} finite mixing weights, got {weights}")
        m = modulation_vector(parts["experts"], weights)
        weight = base_weights.get(name) if base_weights is not None else None
        for suffix, value in fold(parts["base"], m, config.base, name, weight).items():
            out[f"{MODEL_PREFIX}{name}.{suffix}"] = value.detach().contiguous().clone()
    return out


def _exported_config(config: LimeConfig) -> Any:
    base = copy.deepcopy(config.base)
    base.inference_mode = True
    for field_name in ("base_model_name_or_path", "revision", "task_type"):
        value = getattr(config, field_name, None)
        if value is not None:
            setattr(base, field_name, value)
    return base


def write_adapter(
    state_dict: Mapping[str, torch.Tensor],
    config: LimeConfig,
    profile: Mapping[str, torch.Tensor],
    out: Path,
    base_weights: Optional[Mapping[str, torch.Tensor]] = None,
) -> Path:
    """Fold one profile and write the plain adapter directory ``out``."""
    from safetensors.torch import save_file

    tensors = export_state_dict(state_dict, config, profile, base_weights)
    out.mkdir(parents=True, exist_ok=True)
    _exported_config(config).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def export_static(
    model: Any,
    profiles: Mapping[str, Mapping[str, torch.Tensor]],
    output_dir: Union[str, Path],
    adapter_name: Optional[str] = None,
) -> dict[str, Path]:
    """Write one plain adapter of the base tuner per routing profile: ``output_dir/<profile name>/``.

    Args:
        model: the PeftModel holding the LiME adapter.
        profiles: {profile name: {layer name: (E,) mixing weights}}, e.g. from ``collect_routing_profiles``
            ("global" and one per task) or ``load_routing_profiles``.
        output_dir: parent directory of the exported adapters.
        adapter_name: the LiME adapter (default: the active one).

    Returns:
        {profile name: adapter directory}. Each loads with ``PeftModel.from_pretrained`` of released PEFT alone and
        equals the LiME model run under ``static_routing(model, profiles[name])``.
    """
    from peft.utils import get_peft_model_state_dict

    adapter = adapter_name or model.active_adapter
    config = model.peft_config[adapter]
    if not isinstance(config, LimeConfig):
        raise ValueError(f"adapter_name: {adapter!r} is a {type(config).__name__}, not a LiME adapter")
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter)
    base_weights = _base_weights(model) if getattr(config.base, "use_dora", False) else None
    return _export_all(state_dict, config, profiles, Path(output_dir), base_weights)


def _base_weights(model: Any) -> dict[str, torch.Tensor]:
    """{layer name: frozen (out, in) weight} of every LiME layer, dequantized, as DoRA reads it."""
    from peft.utils.integrations import dequantize_module_weight
    from peft.utils.other import transpose

    from .layer import LimeLayer

    weights = {}
    for module in model.modules():
        if isinstance(module, LimeLayer):
            weight = dequantize_module_weight(module.get_base_layer()).detach().float()
            weights[module.layer_name] = transpose(weight, getattr(module.base_layer, "fan_in_fan_out", False))
    return weights


def export_static_from_pretrained(
    adapter_dir: Union[str, Path], profiles: Mapping[str, Mapping[str, torch.Tensor]], output_dir: Union[str, Path]
) -> dict[str, Path]:
    """``export_static`` from a saved LiME adapter directory (no base model needed)."""
    from peft.utils.save_and_load import load_peft_weights

    config = LimeConfig.from_pretrained(str(adapter_dir))
    return _export_all(load_peft_weights(str(adapter_dir), device="cpu"), config, profiles, Path(output_dir))


def _export_all(
    state_dict: Mapping[str, torch.Tensor],
    config: LimeConfig,
    profiles: Mapping,
    out: Path,
    base_weights: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, Path]:
    if not profiles:
        raise ValueError("profiles: nothing to export (no routing profile given)")
    written = {}
    for name, profile in profiles.items():
        if not name or Path(name).name != name:
            raise ValueError(f"profiles: {name!r} is not usable as a directory name")
        written[name] = write_adapter(state_dict, config, profile, out / name, base_weights)
        logger.info("exported static routing %r to %s", name, written[name])
    (out / "lime_export.json").write_text(
        json.dumps({"source_peft_type": "LIME", "base_peft_type": str(config.base.peft_type.value),
                    "num_experts": config.num_experts, "profiles": sorted(written)}, indent=2)
    )
    return written


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """Command line: export every (or the named) profile of a routing-profiles file as a plain adapter."""
    parser = argparse.ArgumentParser(prog="python -m peft_lime.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="saved LiME adapter directory")
    parser.add_argument("--routing", required=True, help="routing profiles (peft_lime.save_routing_profiles)")
    parser.add_argument("--output-dir", required=True, help="one sub-directory per exported profile is written here")
    parser.add_argument("--profile", action="append", help="export only this profile (repeatable)")
    args = parser.parse_args(argv)
    profiles = load_routing_profiles(args.routing)
    if args.profile:
        unknown = sorted(set(args.profile) - set(profiles))
        if unknown:
            parser.error(f"--profile: {unknown} not in {args.routing} (it has {sorted(profiles)})")
        profiles = {name: profiles[name] for name in args.profile}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return export_static_from_pretrained(args.adapter, profiles, args.output_dir)


if __name__ == "__main__":
    main()
