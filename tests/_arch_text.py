"""Architecture-matrix builders of text models: decoder LMs, MoE LMs, state space, encoders (tests/_arch_models.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._arch_common import (
    _LLAMA_TARGETS,
    _ROPE_LM,
    _TEXT,
    FFN,
    HEADS,
    HIDDEN,
    LAYERS,
    PAD,
    ArchModel,
    _causal,
    _seeded,
    _text_sample,
)
from ._models import VOCAB

# --- decoder LMs -------------------------------------------------------------------------------------------------------


def llama(seed: int = 0) -> ArchModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    return _causal(_seeded(seed, lambda: LlamaForCausalLM(LlamaConfig(**_ROPE_LM))), _LLAMA_TARGETS)


def qwen2(seed: int = 0) -> ArchModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _causal(_seeded(seed, lambda: Qwen2ForCausalLM(Qwen2Config(**_ROPE_LM))), _LLAMA_TARGETS)


def qwen3(seed: int = 0) -> ArchModel:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _causal(_seeded(seed, lambda: Qwen3ForCausalLM(Qwen3Config(**_ROPE_LM, head_dim=8))), _LLAMA_TARGETS)


def mistral(seed: int = 0) -> ArchModel:
    from transformers import MistralConfig, MistralForCausalLM

    return _causal(_seeded(seed, lambda: MistralForCausalLM(MistralConfig(**_ROPE_LM))), _LLAMA_TARGETS)


def gemma(seed: int = 0) -> ArchModel:
    from transformers import GemmaConfig, GemmaForCausalLM

    return _causal(_seeded(seed, lambda: GemmaForCausalLM(GemmaConfig(**_ROPE_LM, head_dim=8))), _LLAMA_TARGETS)


def gemma2(seed: int = 0) -> ArchModel:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**_ROPE_LM, head_dim=8, sliding_window=16)
    return _causal(_seeded(seed, lambda: Gemma2ForCausalLM(config)), _LLAMA_TARGETS)


def phi3(seed: int = 0) -> ArchModel:
    from transformers import Phi3Config, Phi3ForCausalLM

    return _causal(
        _seeded(seed, lambda: Phi3ForCausalLM(Phi3Config(**_ROPE_LM))),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    )


def phi(seed: int = 0) -> ArchModel:
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(**_ROPE_LM)
    return _causal(_seeded(seed, lambda: PhiForCausalLM(config)), ["q_proj", "v_proj", "dense", "fc1", "fc2"])


def gpt2(seed: int = 0) -> ArchModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**_TEXT, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64)
    return _causal(_seeded(seed, lambda: GPT2LMHeadModel(config)), ["c_attn", "c_proj", "c_fc"])


def gpt_neox(seed: int = 0) -> ArchModel:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        **_TEXT, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=64,
    )  # fmt: skip
    return _causal(
        _seeded(seed, lambda: GPTNeoXForCausalLM(config)),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    )


def opt(seed: int = 0) -> ArchModel:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        **_TEXT, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        word_embed_proj_dim=HIDDEN, max_position_embeddings=64,
    )  # fmt: skip
    return _causal(_seeded(seed, lambda: OPTForCausalLM(config)), ["q_proj", "v_proj", "fc1", "fc2"])


def falcon(seed: int = 0) -> ArchModel:
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        **_TEXT, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, new_decoder_architecture=False,
        multi_query=True, parallel_attn=True, bias=False, alibi=False,
    )  # fmt: skip
    return _causal(
        _seeded(seed, lambda: FalconForCausalLM(config)),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    )


# --- MoE LMs: the attention projections (the experts are fused parameters, see test_target_parameters_*) --------------


def mixtral(seed: int = 0) -> ArchModel:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**_ROPE_LM, num_local_experts=4, num_experts_per_tok=2)
    return _causal(_seeded(seed, lambda: MixtralForCausalLM(config)), ["q_proj", "k_proj", "v_proj", "o_proj"])


def qwen3_moe(seed: int = 0) -> ArchModel:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**_ROPE_LM, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    return _causal(_seeded(seed, lambda: Qwen3MoeForCausalLM(config)), ["q_proj", "k_proj", "v_proj", "o_proj"])


# --- state space --------------------------------------------------------------------------------------------------------


def mamba(seed: int = 0) -> ArchModel:
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        **_TEXT, hidden_size=HIDDEN, state_size=4, num_hidden_layers=LAYERS, expand=2, conv_kernel=4, time_step_rank=4
    )
    # PEFT refuses LoRA on Mamba's out_proj and conv1d; dt_proj's weight is read directly, its forward never runs
    return _causal(_seeded(seed, lambda: MambaForCausalLM(config)), ["in_proj", "x_proj"], positions=False)


# --- encoders (masked-LM heads: logits per token) ----------------------------------------------------------------------

_BERT = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
    max_position_embeddings=64, pad_token_id=PAD,
)  # fmt: skip


def _masked(model: nn.Module, targets: Any, positions: bool = True) -> ArchModel:
    return ArchModel(model, targets, "masked", position_key="position_ids" if positions else None, sample=_text_sample)


def bert(seed: int = 0) -> ArchModel:
    from transformers import BertConfig, BertForMaskedLM

    return _masked(
        _seeded(seed, lambda: BertForMaskedLM(BertConfig(**_BERT))), ["query", "value", "intermediate.dense"]
    )


def roberta(seed: int = 0) -> ArchModel:
    from transformers import RobertaConfig, RobertaForMaskedLM

    # RoBERTa numbers positions itself from the padding token (padding_idx + 1 onwards): no position_ids passed.
    model = _seeded(seed, lambda: RobertaForMaskedLM(RobertaConfig(**_BERT)))
    return _masked(model, ["query", "value", "intermediate.dense"], positions=False)


def distilbert(seed: int = 0) -> ArchModel:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    config = DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=64,
        pad_token_id=PAD,
    )  # fmt: skip
    return _masked(_seeded(seed, lambda: DistilBertForMaskedLM(config)), ["q_lin", "v_lin", "lin1", "lin2"])
