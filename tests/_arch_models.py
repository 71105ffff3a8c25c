"""Tiny random models of many architectures, built offline from transformers config classes (no Hub), for the
architecture matrix (tests/test_arch_matrix.py).

One builder per architecture returns an `ArchModel`: the model (eval mode, seeded), the target modules LiME wraps, and
how its inputs are laid out. Sizes are tiny (width 32, 2 layers, vocabulary VOCAB) so the whole matrix takes well under a minute of CPU.

Input layouts (`ArchModel.kind`):
- "causal": input_ids (+ attention_mask, + position_ids when the model takes them), logits per token
- "masked": an encoder with an LM head: the same, logits per token, no generation
- "seq2seq": padded encoder input_ids, a fixed-length decoder_input_ids per sample, logits per decoder token
- "speech": Whisper: fixed-length input_features (no padding there), padded decoder_input_ids
- "vision": pixel_values only: no padding notion, no generation
- "vlm": text with image tokens plus the image inputs of that model, logits per token
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ._models import VOCAB

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
PAD, EOS, BOS = 0, 1, 2
FIRST_TOKEN = 3  # random tokens are drawn from [FIRST_TOKEN, TOKEN_END): never padding / eos / bos / image tokens
TOKEN_END = 96
IMAGE_TOKEN = 100  # VOCAB - 1: the image placeholder of the vision-language models


@dataclass
class Sample:
    """One unbatched sample: `ids` (1D, the axis that is padded), `seq` (other 1D tensors padded like ids) and
    `extras` (tensors with a leading batch dimension of 1, concatenated as they are)."""

    ids: Optional[torch.Tensor] = None
    seq: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ArchModel:
    model: nn.Module
    targets: Any  # target_modules of the LoRA config: a list of names or a regex
    kind: str
    # names of the padded ids, their mask and their positions (None: the model takes no position ids there)
    ids_key: Optional[str] = "input_ids"
    mask_key: Optional[str] = "attention_mask"
    position_key: Optional[str] = None
    # sample(gen, length) -> Sample; length counts the padded axis' tokens
    sample: Callable[[torch.Generator, int], Sample] = None  # type: ignore[assignment]
    # tokens per sample of the padded axis in the batch-invariance check, and of a generation prompt
    lengths: tuple[int, ...] = (5, 8, 6)
    prompt_length: int = 6
    # modules the model runs but whose output it discards: no gradient reaches their adapters, with or without LiME
    discarded: tuple[str, ...] = ()
    name: str = ""  # set by build()


def _tokens(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(FIRST_TOKEN, TOKEN_END, (n,), generator=gen)


def _text_sample(gen: torch.Generator, length: int) -> Sample:
    return Sample(ids=_tokens(gen, length))


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return build().eval()


_TEXT = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
_ROPE_LM = dict(
    _TEXT,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=64,
)
_LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _causal(model: nn.Module, targets: Any, positions: bool = True) -> ArchModel:
    return ArchModel(model, targets, "causal", position_key="position_ids" if positions else None, sample=_text_sample)


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


# --- the matrix ------------------------------------------------------------------------------------------------------------

FAMILIES: dict[str, list[Callable[..., ArchModel]]] = {
    "decoder": [llama, qwen2, qwen3, mistral, gemma, gemma2, phi3, phi, gpt2, gpt_neox, opt, falcon],
    "moe": [mixtral, qwen3_moe],
    "ssm": [mamba],
    "encoder": [bert, roberta, distilbert],
    "encoder-decoder": [t5, bart, whisper],
    "vision": [vit, clip_vision],
    "vlm": [llava, qwen2_vl, idefics3, smolvlm, paligemma],
}
ARCHS: dict[str, Callable[..., ArchModel]] = {b.__name__: b for builders in FAMILIES.values() for b in builders}
FAMILY_OF: dict[str, str] = {b.__name__: family for family, builders in FAMILIES.items() for b in builders}


def build(name: str, seed: int = 0) -> ArchModel:
    arch = ARCHS[name](seed)
    arch.name = name
    return arch


def collate(arch: ArchModel, samples: list[Sample], side: str = "right") -> dict[str, torch.Tensor]:
    """A batch of samples, padded on `side` along the ids axis, with mask and (where the model takes them) positions."""
    batch: dict[str, torch.Tensor] = {}
    if samples[0].ids is not None:
        width = max(len(s.ids) for s in samples)
        ids = torch.full((len(samples), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        seq = {key: torch.zeros_like(ids) for key in samples[0].seq}
        for i, s in enumerate(samples):
            n = len(s.ids)
            cols = slice(0, n) if side == "right" else slice(width - n, width)
            ids[i, cols], mask[i, cols] = s.ids, 1
            for key, value in s.seq.items():
                seq[key][i, cols] = value
        batch[arch.ids_key] = ids
        batch[arch.mask_key] = mask
        batch.update(seq)
        if arch.position_key is not None:
            batch[arch.position_key] = (mask.cumsum(-1) - 1).clamp_min(0)
    for key in samples[0].extras:
        batch[key] = torch.cat([s.extras[key] for s in samples])
    return batch


def samples(arch: ArchModel, lengths: tuple[int, ...], seed: int = 1) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    return [arch.sample(gen, n) for n in lengths]
