"""What LiME can wrap, and the errors its layers raise for what they cannot do (merging, mixed-adapter batches)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

MERGE_ERROR = (
    "LiME adapters cannot be merged into the base weights: each token's adapter output is multiplied by an "
    "input-dependent mix of expert vectors, so no single weight matrix reproduces it. Keep the adapter unmerged "
    "(or use unload() to get the base model back)."
)
ADAPTER_NAMES_ERROR = (
    "adapter_names: LiME does not support mixed-adapter batches (a different adapter per row); call "
    "model.set_adapter(name) and run one batch per adapter"
)
# Layers whose output features are not the last dimension of their output, or whose forward is not one map.
_UNWRAPPABLE = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def check_wrappable(module: nn.Module, layer_name: str = "") -> None:
    """Refuse, before anything is created, a target LiME cannot wrap (names the layer and what to do)."""
    frozen = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    out_features = None
    if not isinstance(frozen, _UNWRAPPABLE):
        try:
            out_features = _get_in_out_features(frozen)[1]
        except (ValueError, AttributeError):
            out_features = None
    if out_features is None:
        raise TypeError(
            f"LiME wraps layers whose output features are the last dimension (Linear, Conv1D, quantized linear); "
            f"{layer_name or 'this layer'} is a {type(frozen).__name__}. Remove it from target_modules."
        )
