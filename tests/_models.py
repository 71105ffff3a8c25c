"""Tiny models and configs built offline from configs, shared by the tests."""

from __future__ import annotations

import torch

import peft_lime

VOCAB = 101


def tiny_llama_config(**overrides):
    """The tiny Llama every test builds on (2 layers, width 32, GQA 4 / 2 heads, vocab VOCAB); overrides win."""
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()


def tiny_bert_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        max_position_embeddings=128,
    )
    return BertForSequenceClassification(cfg).eval()


def lora(**kwargs):
    from peft import LoraConfig

    kwargs.setdefault("r", 4)
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    # Random B so the adapter output is non-zero from the start: otherwise every test of LiME's modulation
    # would compare zeros.
    kwargs.setdefault("init_lora_weights", False)
    return LoraConfig(**kwargs)


def lime(base=None, **kwargs):
    kwargs.setdefault("num_experts", 4)
    return peft_lime.LimeConfig(base=base if base is not None else lora(), **kwargs)


def scatter_experts(model, seed: int = 1, gate: float = 0.5) -> None:
    """Expert vectors, shared vectors and gates far from their init (1 and 0), so that a wrong route shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft_lime.LimeExperts):
                module.weight.normal_(generator=gen)
                if module.shared is not None:
                    module.shared.normal_(generator=gen)
                    module.gate.fill_(gate)
