"""Explicit adapter contributions, one small function per base-tuner family, found through a registry.

LiME needs the frozen output h and the adapter's additive contribution delta separately. Computing delta as
(adapter output - h) costs a second base call and, in bf16, loses precision (28% relative error in a probe, against
0.2% explicit), so every family computes delta directly, reusing the one base output h where its math needs it.

A function takes (tuner_layer, x, adapter_name, h) and returns delta (same shape as h), or None when the adapter is
skipped for this call (e.g. LyCORIS module dropout). Third-party tuners plug in with ``register_delta``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.utils.integrations import dequantize_module_weight
from peft.utils.other import transpose
from torch import nn

DeltaFn = Callable[[nn.Module, torch.Tensor, str, torch.Tensor], Optional[torch.Tensor]]
_DELTA_REGISTRY: dict[type, DeltaFn] = {}


def register_delta(layer_cls: type) -> Callable[[DeltaFn], DeltaFn]:
    """Decorator: declare how to compute the explicit delta of ``layer_cls`` (and its subclasses)."""

    def decorator(fn: DeltaFn) -> DeltaFn:
        _DELTA_REGISTRY[layer_cls] = fn
        return fn

    return decorator


def find_delta_fn(layer: nn.Module) -> DeltaFn:
    """The delta function for a tuner layer, by its class hierarchy; clear error when none is known."""
    for cls in type(layer).__mro__:
        if cls in _DELTA_REGISTRY:
            return _DELTA_REGISTRY[cls]
    known = ", ".join(sorted(c.__name__ for c in _DELTA_REGISTRY))
    raise TypeError(
        f"LiME has no explicit-delta function for {type(layer).__name__} (known: {known}). Register one with "
        "peft_lime.register_delta(YourLayerClass)"
    )


def check_lora_variants(layer: LoraLayer, adapter_name: str) -> None:
    """LoRA variants change the forward; only those with a known explicit delta are accepted."""
    from peft.tuners.lora.variants import DoraLinearVariant

    variant = layer.lora_variant.get(adapter_name)
    if variant is not None and not isinstance(variant, DoraLinearVariant):
        raise TypeError(
            f"LiME supports plain LoRA, rsLoRA and DoRA on linear layers; the LoRA variant {type(variant).__name__} "
            "has no explicit-delta implementation"
        )


@register_delta(LoraLayer)
def lora_delta(layer: LoraLayer, x: torch.Tensor, adapter: str, h: torch.Tensor) -> torch.Tensor:
    """LoRA / rsLoRA: s * B A dropout(x). DoRA: its magnitude-rescaled term, reusing h as PEFT's forward does."""
    lora_A = layer.lora_A[adapter]
    lora_B = layer.lora_B[adapter]
    dropout = layer.lora_dropout[adapter]
    scaling = layer.scaling[adapter]
    x = layer._cast_input_dtype(x, lora_A.weight.dtype)
    if adapter not in layer.lora_variant:
        return lora_B(lora_A(dropout(x))) * scaling
    # DoRA (the only variant admitted by check_lora_variants). With active dropout PEFT recomputes the base term on
    # the dropped-out input; we do the same so that LiME with m = 1 equals DoRA exactly.
    if isinstance(dropout, nn.Identity) or not layer.training:
        base_result = h
    else:
        x = dropout(x)
        base_result = None
    return layer.lora_magnitude_vector[adapter](
        x,
        lora_A=lora_A,
        lora_B=lora_B,
        scaling=scaling,
        base_layer=layer.get_base_layer(),
        base_result=base_result,
        adapter_name=adapter,
    )


@register_delta(IA3Layer)
def ia3_delta(layer: IA3Layer, x: torch.Tensor, adapter: str, h: torch.Tensor) -> torch.Tensor:
    """IA3 output form: h * (l - 1). Feed-forward form: W (x * (l - 1)), the base map being linear."""
    scale = layer.ia3_l[adapter].flatten()
    if not layer.is_feedforward:
        return h * (scale - 1.0).to(h.dtype)
    base = layer.get_base_layer()
    weight = dequantize_module_weight(base)
    weight = transpose(weight, getattr(layer, "fan_in_fan_out", False))
    return F.linear((x.to(scale.dtype) * (scale - 1.0)).to(weight.dtype), weight)


@register_delta(LycorisLayer)
def lycoris_delta(layer: LycorisLayer, x: torch.Tensor, adapter: str, h: torch.Tensor) -> Optional[torch.Tensor]:
    """LoHa / LoKr: their own delta activations; module dropout skips the adapter for this call, as in PEFT."""
    module_dropout = layer.module_dropout[adapter]
    if layer.training and module_dropout and torch.rand(1) <= module_dropout:
        return None
    return layer._get_delta_activations(adapter, x)


def lora_factors(
    layer: nn.Module, adapter: str, x: torch.Tensor
) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
    """Plain LoRA as factors (a, B, scaling) with delta = scaling * B a and a = A dropout(x); None when not plain.

    Lets LiME save only the (N, r) hidden state a for backward instead of the (N, d) delta (see modulation.py). Only
    for an up-projection that is an ordinary, unwrapped ``nn.Linear`` without bias whose weight is a plain parameter:
    FSDP-wrapped leaves (another class), DeepSpeed ZeRO-3 partitioned weights (``ds_id``), LoRA variants and lora_bias
    keep the generic path, which only calls the modules. Autocast keeps it too (the fused backward casts explicitly).
    """
    if not isinstance(layer, LoraLayer) or adapter in layer.lora_variant or torch.is_autocast_enabled(x.device.type):
        return None
    lora_B = layer.lora_B[adapter]
    if type(lora_B) is not nn.Linear or lora_B.bias is not None:
        return None
    weight = lora_B.weight
    if type(weight) is not nn.Parameter or hasattr(weight, "ds_id"):
        return None
    lora_A = layer.lora_A[adapter]
    x = layer._cast_input_dtype(x, lora_A.weight.dtype)
    return lora_A(layer.lora_dropout[adapter](x)), weight, layer.scaling[adapter]
