"""A LLaVA-style vision-language model (tiny CLIP vision tower + tiny Llama) with LiME on both towers."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peft_lime
from peft_lime import LimeLayer

from ._models import tiny_llama_config

IMAGE_TOKEN = 100
N_IMAGE_TOKENS = 5  # (16 / 8)^2 patches + CLS, vision_feature_select_strategy="full"
TARGETS = r".*(vision_tower.*(q_proj|fc1)|language_model.*(q_proj|v_proj|down_proj))"


def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    text = tiny_llama_config(vocab_size=IMAGE_TOKEN + 1)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return LlavaForConditionalGeneration(config).eval()


def lime_vlm(seed: int = 0):
    config = peft_lime.LimeConfig(base=LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), num_experts=4)
    torch.manual_seed(seed)
    return get_peft_model(tiny_llava(seed), config)


def _inputs(lengths: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch: token 0 is BOS-like, then the image tokens, then text."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 99, (n,), generator=g)
        ids[i, 1 : 1 + N_IMAGE_TOKENS] = IMAGE_TOKEN
        mask[i, :n] = 1
    pixels = torch.randn(len(lengths), 3, 16, 16, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def test_both_towers_are_wrapped_and_every_trainable_tensor_gets_gradient():
    model = lime_vlm()
    names = [n for n, m in model.named_modules() if isinstance(m, LimeLayer)]
    assert sum("vision_tower" in n for n in names) == 4 and sum("language_model" in n for n in names) == 6
    model.train()
    batch = _inputs([12, 9])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if name.endswith("lime_experts.default.weight"):
                assert p.grad.abs().sum() > 0, name


def test_sample_logits_do_not_depend_on_the_batch():
    model = lime_vlm().eval()
    batch = _inputs([12, 9])
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**{k: v[1:2, :9] if v.dim() == 2 else v[1:2] for k, v in batch.items()}).logits
    torch.testing.assert_close(together[1, :9], alone[0], atol=1e-4, rtol=0)


def test_save_load_round_trip(tmp_path):
    model = lime_vlm().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    batch = _inputs([12, 9])
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llava(0), tmp_path).eval()
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
