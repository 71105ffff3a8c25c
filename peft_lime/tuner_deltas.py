"""Extractors for PEFT's own tuners: LoRA (incl. rsLoRA and DoRA), IA3, LoHa / LoKr. See deltas.py."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.utils.integrations import dequantize_module_weight
from peft.utils.other import transpose
from torch import nn

from .deltas import LowRankDelta, plain_linear_weight, register_delta


def check_lora_variants(layer: LoraLayer, adapter_name: str) -> None:
    """LoRA variants change the forward; only those with a known explicit delta are accepted."""
    from peft.tuners.lora.variants import DoraLinearVariant

    variant = layer.lora_variant.get(adapter_name)
    if variant is not None and not isinstance(variant, DoraLinearVariant):
        raise TypeError(
            f"LiME supports plain LoRA, rsLoRA and DoRA on linear layers; the LoRA variant {type(variant).__name__} "
            "has no explicit-delta implementation"
        )


def _plain(module: nn.Module) -> Optional[torch.Tensor]:
    """The weight of a plain bias-free ``nn.Linear`` without hooks (its call can be one ``F.linear``), else None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    return plain_linear_weight(module)


def _lora_hidden(layer: LoraLayer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """a = A dropout(x), as PEFT computes it; one ``F.linear`` when nothing else can happen (decoding pays the
    Python of every module call, once per layer and token)."""
    lora_A, dropout = layer.lora_A[adapter], layer.lora_dropout[adapter]
    x = layer._cast_input_dtype(x, lora_A.weight.dtype)
    weight_A = _plain(lora_A)
    if weight_A is not None and isinstance(dropout, nn.Identity):
        return F.linear(x, weight_A)
    return lora_A(dropout(x))


def lora_factors(layer: LoraLayer, adapter: str, x: torch.Tensor) -> Optional[LowRankDelta]:
    """Plain LoRA as factors: a = A dropout(x), B = lora_B's weight; None for variants and lora_bias.

    Autocast keeps the generic path too (the fused backward casts explicitly, autocast would cast differently).
    """
    if adapter in layer.lora_variant or torch.is_autocast_enabled(x.device.type):
        return None
    weight = plain_linear_weight(layer.lora_B[adapter])
    if weight is None:
        return None
    return LowRankDelta(_lora_hidden(layer, adapter, x), weight, layer.scaling[adapter])


@register_delta(LoraLayer, check=check_lora_variants, factors=lora_factors)
def lora_delta(layer: LoraLayer, x: torch.Tensor, adapter: str, h: torch.Tensor) -> torch.Tensor:
    """LoRA / rsLoRA: s * B A dropout(x). DoRA: its magnitude-rescaled term, reusing h as PEFT's forward does."""
    lora_B = layer.lora_B[adapter]
    scaling = layer.scaling[adapter]
    if adapter not in layer.lora_variant:
        a = _lora_hidden(layer, adapter, x)
        weight_B = _plain(lora_B)
        return (F.linear(a, weight_B) if weight_B is not None else lora_B(a)) * scaling
    lora_A = layer.lora_A[adapter]
    dropout = layer.lora_dropout[adapter]
    x = layer._cast_input_dtype(x, lora_A.weight.dtype)
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
