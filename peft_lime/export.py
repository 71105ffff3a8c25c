"""Export a LiME adapter with static routing as plain adapters of its base tuner (servable, mergeable).

With the routing weights of a layer held fixed (static_routing.py), LiME's modulation is one vector m per layer and
the layer computes h + m * delta(x). For the tuners below that is exactly an adapter of the same type and size:
- LoRA / rsLoRA (also with lora_bias): m * (s B A x + s b) = s (diag(m) B) A x + s (m * b): scale B's rows (and bias);
- IA3 on outputs: h + m * h (l - 1) = h * (1 + m (l - 1)): a new scaling vector;
- LoHa: m * ((W1a W1b) o (W2a W2b)) x = ((diag(m) W1a) W1b) o (W2a W2b) x: scale W1a's rows.
- DoRA: a DoRA with new B and magnitude (see export_folds._fold_dora; needs the base weights, so the model, not the command line).
IA3 on inputs (feed-forward modules) and LoKr (a Kronecker product keeps no row scaling) are refused with an error.

    python -m peft_lime.export --adapter ADAPTER_DIR --routing profiles.safetensors --output-dir OUT [--overwrite]

writes OUT/<profile>/ (adapter_config.json with the base tuner's peft_type, adapter_model.safetensors) for every
profile of the file: adapters that released PEFT loads without peft_lime and merges with merge_and_unload. Nothing is
written outside OUT (profile names must be plain directory names), and nothing existing is replaced without
--overwrite (export_paths.py).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import LimeConfig
from .export_folds import FOLDS
from .export_paths import MANIFEST_NAME, check_targets, write_replacing
from .static_routing import check_mixing_weights, load_routing_profiles

logger = logging.getLogger(__name__)

# Keys of the saved state dict: PeftModel prefix, then the layer name, then these.
MODEL_PREFIX = "base_model.model."
BASE_INFIX = ".base_layer."
EXPERTS_INFIX = ".lime_experts."


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
        # The checks of static_routing: an exported adapter computes what the LiME model computes under that profile.
        weights = check_mixing_weights(name, profile[name], parts["experts"]["weight"].shape[0])
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
    tensors = export_state_dict(state_dict, config, profile, base_weights)
    out.mkdir(parents=True, exist_ok=True)
    _write_folded(tensors, config, out)
    return out


def _write_folded(tensors: Mapping[str, torch.Tensor], config: LimeConfig, out: Path) -> None:
    from safetensors.torch import save_file

    _exported_config(config).save_pretrained(str(out))
    save_file(dict(tensors), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def export_static(
    model: Any,
    profiles: Mapping[str, Mapping[str, torch.Tensor]],
    output_dir: Union[str, Path],
    adapter_name: Optional[str] = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write one plain adapter of the base tuner per routing profile: ``output_dir/<profile name>/``.

    Args:
        model: the PeftModel holding the LiME adapter.
        profiles: {profile name: {layer name: (E,) mixing weights}}, e.g. from ``collect_routing_profiles``
            ("global" and one per task) or ``load_routing_profiles``.
        output_dir: parent directory of the exported adapters.
        adapter_name: the LiME adapter (default: the active one).
        overwrite: replace profile directories (and lime_export.json) that already exist in ``output_dir``; without
            it an export refuses to write over anything. A replaced directory keeps none of its old files.

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
    return _export_all(state_dict, config, profiles, Path(output_dir), base_weights, overwrite)


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
    adapter_dir: Union[str, Path],
    profiles: Mapping[str, Mapping[str, torch.Tensor]],
    output_dir: Union[str, Path],
    overwrite: bool = False,
) -> dict[str, Path]:
    """``export_static`` from a saved LiME adapter directory (no base model needed)."""
    from peft.utils.save_and_load import load_peft_weights

    config = LimeConfig.from_pretrained(str(adapter_dir))
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    return _export_all(weights, config, profiles, Path(output_dir), overwrite=overwrite)


def _export_all(
    state_dict: Mapping[str, torch.Tensor],
    config: LimeConfig,
    profiles: Mapping,
    out: Path,
    base_weights: Optional[Mapping[str, torch.Tensor]] = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    if not profiles:
        raise ValueError("profiles: nothing to export (no routing profile given)")
    targets = check_targets(out, profiles, overwrite)
    # Every profile is folded (and so checked) before anything is written: a bad profile leaves no partial export.
    folded = {name: export_state_dict(state_dict, config, profile, base_weights) for name, profile in profiles.items()}
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, tensors in folded.items():
        written[name] = write_replacing(targets[name], functools.partial(_write_folded, tensors, config))
        logger.info("exported static routing %r to %s", name, written[name])
    (out / MANIFEST_NAME).write_text(
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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace profile directories that already exist in --output-dir"
    )
    args = parser.parse_args(argv)
    # Wrong arguments end in one line naming the argument (exit 2), not a traceback.
    try:
        profiles = load_routing_profiles(args.routing)
    except (OSError, ValueError) as exc:
        parser.error(f"--routing: {exc}")
    if args.profile:
        unknown = sorted(set(args.profile) - set(profiles))
        if unknown:
            parser.error(f"--profile: {unknown} not in {args.routing} (it has {sorted(profiles)})")
        profiles = {name: profiles[name] for name in args.profile}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return export_static_from_pretrained(args.adapter, profiles, args.output_dir, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:  # a refused export (bad profile name, existing files, unreadable adapter)
        parser.error(str(exc))


if __name__ == "__main__":
    main()
