"""Architecture-matrix builders of encoder-decoders, vision encoders and vision-language models (tests/_arch_models.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._arch_common import (
    _ROPE_LM,
    BOS,
    EOS,
    FFN,
    HEADS,
    HIDDEN,
    IMAGE_TOKEN,
    LAYERS,
    PAD,
    ArchModel,
    Sample,
    _seeded,
    _tokens,
)
from ._models import VOCAB

# --- encoder-decoders ----------------------------------------------------------------------------------------------------

DECODER_LENGTH = 4


def _seq2seq_sample(gen: torch.Generator, length: int) -> Sample:
    decoder = torch.cat([torch.tensor([PAD]), _tokens(gen, DECODER_LENGTH - 1)])  # starts with decoder_start_token_id
    return Sample(ids=_tokens(gen, length), extras={"decoder_input_ids": decoder[None]})


def t5(seed: int = 0) -> ArchModel:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=8, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
    )  # fmt: skip
    model = _seeded(seed, lambda: T5ForConditionalGeneration(config))
    return ArchModel(model, ["q", "v", "o", "wi", "wo"], "seq2seq", sample=_seq2seq_sample)


def bart(seed: int = 0) -> ArchModel:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, decoder_start_token_id=PAD, forced_eos_token_id=None,
    )  # fmt: skip
    model = _seeded(seed, lambda: BartForConditionalGeneration(config))
    return ArchModel(model, ["q_proj", "v_proj", "fc1", "fc2"], "seq2seq", sample=_seq2seq_sample)


MEL_BINS, AUDIO_FRAMES = 8, 16


def _whisper_sample(gen: torch.Generator, length: int) -> Sample:
    decoder = torch.cat([torch.tensor([BOS]), _tokens(gen, length - 1)])
    return Sample(ids=decoder, extras={"input_features": torch.randn(1, MEL_BINS, AUDIO_FRAMES, generator=gen)})


def whisper(seed: int = 0) -> ArchModel:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_source_positions=AUDIO_FRAMES // 2, max_target_positions=32, pad_token_id=PAD, eos_token_id=EOS,
        bos_token_id=BOS, decoder_start_token_id=BOS, suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip
    model = _seeded(seed, lambda: WhisperForConditionalGeneration(config))
    return ArchModel(
        model, ["q_proj", "v_proj", "fc1", "fc2"], "speech", ids_key="decoder_input_ids",
        mask_key="decoder_attention_mask", position_key="decoder_position_ids", sample=_whisper_sample,
    )  # fmt: skip


# --- vision encoders -----------------------------------------------------------------------------------------------------

IMAGE = 16  # 16 x 16 pixels, patches of 8 (CLIP / ViT) or 4 (the VLMs' towers)


def _pixels(gen: torch.Generator, length: int) -> Sample:
    return Sample(extras={"pixel_values": torch.randn(1, 3, IMAGE, IMAGE, generator=gen)})


_VISION = dict(
    hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=IMAGE,
    patch_size=8,
)  # fmt: skip


def vit(seed: int = 0) -> ArchModel:
    from transformers import ViTConfig, ViTForImageClassification

    model = _seeded(seed, lambda: ViTForImageClassification(ViTConfig(**_VISION, num_labels=3)))
    return ArchModel(model, ["q_proj", "v_proj", "fc1", "fc2"], "vision", None, None, sample=_pixels)


def clip_vision(seed: int = 0) -> ArchModel:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = _seeded(seed, lambda: CLIPVisionModel(CLIPVisionConfig(**_VISION)))
    return ArchModel(model, ["q_proj", "v_proj", "fc1", "fc2"], "vision", None, None, sample=_pixels)


# --- vision-language models ----------------------------------------------------------------------------------------------

_VLM_TEXT = dict(_ROPE_LM, vocab_size=VOCAB)


def _vlm(model: nn.Module, targets: str, sample: Callable[[torch.Generator, int], Sample], images: int) -> ArchModel:
    # every sample carries its image tokens plus at least 3 text tokens
    lengths = (images + 3, images + 6, images + 4)
    return ArchModel(
        model, targets, "vlm", position_key="position_ids", sample=sample, lengths=lengths, prompt_length=images + 3
    )


def _image_text(gen: torch.Generator, length: int, n_image: int, before: int = 1) -> torch.Tensor:
    ids = _tokens(gen, length)
    ids[before : before + n_image] = IMAGE_TOKEN
    return ids


LLAVA_IMAGE_TOKENS = 5  # (16 / 8)^2 patches + CLS (vision_feature_select_strategy="full")


def llava(seed: int = 0) -> ArchModel:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_VISION), text_config=LlamaConfig(**_VLM_TEXT), image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip

    def sample(gen: torch.Generator, length: int) -> Sample:
        ids = _image_text(gen, length, LLAVA_IMAGE_TOKENS)
        return Sample(ids=ids, extras={"pixel_values": torch.randn(1, 3, IMAGE, IMAGE, generator=gen)})

    targets = r".*(vision_tower.*(q_proj|fc1)|language_model.*(q_proj|v_proj|down_proj))"
    return _vlm(_seeded(seed, lambda: LlavaForConditionalGeneration(config)), targets, sample, LLAVA_IMAGE_TOKENS)


QWEN2VL_GRID = (1, 4, 4)  # (t, h, w) patches of one image; merged 2 x 2 -> 4 image tokens
QWEN2VL_PATCH_DIM = 3 * 2 * 4 * 4  # channels x temporal_patch_size x patch_size^2
VISION_START, VISION_END = 97, 98


def qwen2_vl(seed: int = 0) -> ArchModel:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(_VLM_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(
        depth=LAYERS, embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, num_heads=HEADS, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=99,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )  # fmt: skip
    n_image = QWEN2VL_GRID[0] * QWEN2VL_GRID[1] * QWEN2VL_GRID[2] // 4

    def sample(gen: torch.Generator, length: int) -> Sample:
        ids = _image_text(gen, length, n_image + 2)
        ids[1], ids[n_image + 2] = VISION_START, VISION_END
        patches = QWEN2VL_GRID[0] * QWEN2VL_GRID[1] * QWEN2VL_GRID[2]
        return Sample(
            ids=ids,
            extras={
                "pixel_values": torch.randn(patches, QWEN2VL_PATCH_DIM, generator=gen),
                "image_grid_thw": torch.tensor([QWEN2VL_GRID]),
            },
        )

    targets = r".*(visual.*(qkv|fc1)|language_model.*(q_proj|v_proj|down_proj))"
    return _vlm(_seeded(seed, lambda: Qwen2VLForConditionalGeneration(config)), targets, sample, n_image + 2)


IDEFICS3_IMAGE_TOKENS = 4  # (16 / 4)^2 patches, pixel-shuffled by scale_factor 2


def _idefics3_like(seed: int, config_cls: Any, model_cls: Any) -> ArchModel:
    vision = dict(_VISION, patch_size=4)
    text = dict(_VLM_TEXT, model_type="llama")
    config = config_cls(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, scale_factor=2)

    def sample(gen: torch.Generator, length: int) -> Sample:
        ids = _image_text(gen, length, IDEFICS3_IMAGE_TOKENS)
        return Sample(ids=ids, extras={"pixel_values": torch.randn(1, 1, 3, IMAGE, IMAGE, generator=gen)})

    targets = r".*(vision_model.*(q_proj|fc1)|text_model.*(q_proj|v_proj|down_proj))"
    return _vlm(_seeded(seed, lambda: model_cls(config)), targets, sample, IDEFICS3_IMAGE_TOKENS)


def idefics3(seed: int = 0) -> ArchModel:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _idefics3_like(seed, Idefics3Config, Idefics3ForConditionalGeneration)


def smolvlm(seed: int = 0) -> ArchModel:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _idefics3_like(seed, SmolVLMConfig, SmolVLMForConditionalGeneration)


PALIGEMMA_IMAGE_TOKENS = 16  # (16 / 4)^2 patches


def paligemma(seed: int = 0) -> ArchModel:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    vision = dict(_VISION, patch_size=4, model_type="siglip_vision_model")
    text = dict(_VLM_TEXT, head_dim=8, model_type="gemma")
    config = PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vocab_size=VOCAB, projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )  # fmt: skip

    def sample(gen: torch.Generator, length: int) -> Sample:
        # image tokens first, then the prefix (attended bidirectionally with the image), then one suffix token
        ids = _image_text(gen, length, PALIGEMMA_IMAGE_TOKENS, before=0)
        token_type = torch.zeros(length, dtype=torch.long)
        token_type[-1] = 1
        return Sample(
            ids=ids,
            seq={"token_type_ids": token_type},
            extras={"pixel_values": torch.randn(1, 3, IMAGE, IMAGE, generator=gen)},
        )

    # also matches SigLIP's pooling head (head.mlp.fc1: one row per image), which the tower runs and PaliGemma discards
    targets = r".*(vision_tower.*(q_proj|fc1)|language_model.*(q_proj|v_proj|down_proj))"
    arch = _vlm(
        _seeded(seed, lambda: PaliGemmaForConditionalGeneration(config)), targets, sample, PALIGEMMA_IMAGE_TOKENS
    )
    arch.discarded = ("vision_tower.head.",)
    return arch
