"""Regressions of issue 24: LiME over LoRA on architectures whose layers see their tokens in unusual ways.

Falcon modifies a wrapped layer's output in place; OPT flattens (batch, time) before its MLP; Mamba keeps a recurrent
cache without a sequence length; PaliGemma's generate calls the vision tower outside the model's forward. Encoder-
decoders are in test_arch_regressions_seq2seq.py. Every model is tiny (width 32, 2 layers), built from its config
class offline, with experts scattered far from 1 so that a wrong route shows in the logits.

Tolerance 1e-4 in float32: batch invariance and cached decoding compute the same sums in another order.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_lime
from peft_lime.aux_grad import inject_aux_loss

from ._models import VOCAB, lime, lora, scatter_experts, tiny_bert_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
PAD, EOS, BOS = 0, 1, 2
IMAGE_TOKEN = VOCAB - 1
GENERATE = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)


def _lime_model(base: torch.nn.Module, targets, n_gram: int = 3):
    torch.manual_seed(0)
    model = get_peft_model(base, lime(lora(target_modules=targets), n_gram=n_gram))
    scatter_experts(model)
    return model.eval()


def _step_logits(model, **kwargs) -> torch.Tensor:
    """(B, steps, V) logits of a greedy generate, step by step."""
    with torch.no_grad():
        return torch.stack(model.generate(**kwargs, **GENERATE).logits, dim=1)


def _assert_cache_consistent(model, **inputs) -> None:
    cached = _step_logits(model, use_cache=True, **inputs)
    uncached = _step_logits(model, use_cache=False, **inputs)
    torch.testing.assert_close(cached, uncached, atol=ATOL, rtol=0)


# --- 1. outputs a model modifies in place (Falcon: mlp_output += attention_output) ------------------------------------


def test_aux_injection_output_may_be_modified_in_place_and_the_aux_gradient_is_exact():
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    scale = 0.25
    aux = (w**2).sum()  # d(aux)/dw = 2 w
    out = inject_aux_loss(x * 2.0, aux, scale)
    out += 1.0  # what Falcon does to its MLP output
    (out * 3.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 6.0), atol=0, rtol=0)
    torch.testing.assert_close(w.grad, scale * 2.0 * w.detach(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("single_gemm", [False, True], ids=["modulate", "low-rank-mix"])
def test_falcon_trains_with_finite_gradients_on_every_expert_tensor(single_gemm, monkeypatch):
    """Both update paths of the layer (modulation.py, low_rank_mix.py) return outputs a model may modify in place."""
    from transformers import FalconConfig, FalconForCausalLM

    if single_gemm:  # the path large calls take (see low_rank_mix.use_low_rank_mix)
        monkeypatch.setattr(peft_lime.low_rank_mix, "LOW_RANK_MIX_MIN_ELEMENTS", 0)

    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=PAD
    )
    assert config.parallel_attn  # the in-place add onto the wrapped dense_4h_to_h output
    model = _lime_model(FalconForCausalLM(config), ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]).train()
    x = torch.randint(3, VOCAB - 1, (2, 7))
    model(input_ids=x, labels=x).loss.backward()
    experts = [(n, p) for n, p in model.named_parameters() if "lime_experts" in n]
    assert len(experts) == 3 * 2 * 3  # weight, shared, gate of 3 targets x 2 layers
    for name, p in experts:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith(".weight"):
            assert p.grad.abs().sum() > 0, name


# --- 2. layers that see (batch * time, d) rows (OPT flattens before its MLP) ------------------------------------------


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return _lime_model(OPTForCausalLM(config).eval(), ["fc1", "fc2"])


def test_opt_flattened_mlp_rows_route_within_their_own_sequence():
    model = _opt()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB - 1, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], ids[1, 6:] = 0, PAD  # right padding
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask).logits
        for i, n in enumerate([9, 6, 9]):
            alone = model(input_ids=ids[i : i + 1, :n]).logits
            torch.testing.assert_close(together[i, :n], alone[0], atol=ATOL, rtol=0)


def test_opt_flattened_mlp_cached_generation_equals_uncached():
    model = _opt()
    prompt = torch.randint(3, VOCAB - 1, (2, 5), generator=torch.Generator().manual_seed(2))
    _assert_cache_consistent(model, input_ids=prompt, attention_mask=torch.ones_like(prompt), pad_token_id=PAD)


def test_pooled_head_rows_route_alone_not_across_the_batch():
    """BERT's pooler sees one (B, d) row per sample: with no token layout, each row is its own sequence."""
    torch.manual_seed(0)
    model = _lime_model(tiny_bert_classifier(), ["query", "value", "pooler.dense"])
    ids = torch.randint(3, VOCAB - 1, (3, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[2, 5:], ids[2, 5:] = 0, PAD
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask).logits
        alone = torch.cat([model(input_ids=ids[i : i + 1, :n]).logits for i, n in enumerate([8, 8, 5])])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)


# --- 4. a vision tower called outside the model's forward (PaliGemma's generate) -------------------------------------


def _paligemma():
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    text = GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, projection_dim=32)
    targets = r".*(vision_tower.*(q_proj|fc1|fc2)|language_model.*(q_proj|v_proj))"
    return _lime_model(PaliGemmaForConditionalGeneration(config).eval(), targets)


def _paligemma_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.cat(
        [torch.full((2, 4), IMAGE_TOKEN), torch.full((2, 1), BOS), torch.randint(3, 90, (2, 4), generator=g)], 1
    )
    return dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 16, 16, generator=g)
    )


def test_paligemma_vision_tower_windows_do_not_inherit_a_finished_decoding_step():
    """PaliGemma itself decodes differently with and without cache (its prefix attends both ways; ~1e-3 in the bare
    model), so each mode is compared with itself: before and after a cached generate, the same logits."""
    model = _paligemma()
    inputs = _paligemma_inputs()
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        uncached_before = _step_logits(model, use_cache=False, pad_token_id=PAD, **inputs)
        cached_first = _step_logits(model, use_cache=True, pad_token_id=PAD, **inputs)
        # generate ran the vision tower outside the model's forward, after which nothing may continue its windows
        again = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        uncached_after = _step_logits(model, use_cache=False, pad_token_id=PAD, **inputs)
        cached_again = _step_logits(model, use_cache=True, pad_token_id=PAD, **inputs)
    torch.testing.assert_close(again, features, atol=0, rtol=0)
    torch.testing.assert_close(uncached_after, uncached_before, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_again, cached_first, atol=ATOL, rtol=0)


# --- 5. recurrent caches without a sequence length (Mamba) -----------------------------------------------------------


def test_mamba_cached_generation_with_ngram_windows_equals_uncached():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        intermediate_size=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    model = _lime_model(MambaForCausalLM(config).eval(), ["in_proj", "x_proj", "out_proj"])
    prompt = torch.randint(3, VOCAB - 1, (2, 5), generator=torch.Generator().manual_seed(4))
    _assert_cache_consistent(model, input_ids=prompt, pad_token_id=PAD)
    assert isinstance(model.base_model, peft_lime.LimeModel)
