"""Trainable-parameter counts of every benchmarked method, from the methods' definitions.

The benchmark asserts that these formulas equal the counts measured on the built modules. Counts are per model:
per-target (or per-FFN) terms summed over the targets of one decoder layer, times the number of layers.
"""

from __future__ import annotations

from typing import Any

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + FFN_TARGETS


def target_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target projection of one Llama decoder layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _lora(shape: tuple[int, int], r: int) -> int:
    """One LoRA adapter on a d_in -> d_out projection: A (r x d_in) + B (d_out x r)."""
    d_in, d_out = shape
    return r * (d_in + d_out)


def lora_params(config: Any, r: int) -> int:
    """Plain LoRA at rank r on the seven targets: r * (in + out) per target."""
    shapes = target_shapes(config)
    return config.num_hidden_layers * sum(_lora(shapes[t], r) for t in TARGETS)


def lime_params(config: Any, r: int, num_experts: int, shared_expert: bool = True) -> int:
    """LiME over LoRA: the LoRA adapter plus E expert vectors of size d_out (+ shared vector d_out and gate 1)."""
    shapes = target_shapes(config)
    extra = sum(num_experts * o + ((o + 1) if shared_expert else 0) for _, o in shapes.values())
    return lora_params(config, r) + config.num_hidden_layers * extra


def mixlora_params(config: Any, r: int, num_experts: int) -> int:
    """MixLoRA: one LoRA on each attention projection, E LoRA experts on each FFN projection, router hidden -> E.

    The router is a bias-free linear layer (``moe_gate`` in the mixlora package).
    """
    shapes = target_shapes(config)
    attention = sum(_lora(shapes[t], r) for t in ATTENTION_TARGETS)
    experts = num_experts * sum(_lora(shapes[t], r) for t in FFN_TARGETS)
    router = config.hidden_size * num_experts
    return config.num_hidden_layers * (attention + experts + router)


def molora_params(config: Any, r: int, num_experts: int) -> int:
    """MoLoRA-style: E full LoRA experts on every target plus a bias-free router in_features -> E per target."""
    shapes = target_shapes(config)
    per_layer = sum(num_experts * _lora(shapes[t], r) + shapes[t][0] * num_experts for t in TARGETS)
    return config.num_hidden_layers * per_layer


def smollm2_135m_config(num_hidden_layers: int = 30) -> Any:
    """SmolLM2-135M's architecture (random init is done by the caller); ``num_hidden_layers`` may be reduced."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        num_hidden_layers=num_hidden_layers,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def llama_1b_config(num_hidden_layers: int = 16) -> Any:
    """A 1B-class Llama (Llama-3.2-1B shapes: hidden 2048, 16 layers, 32 heads, 8 kv heads, MLP 8192)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        num_hidden_layers=num_hidden_layers,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
