"""Shared pieces of the architecture matrix's model builders (tests/_arch_models.py): sizes, token ids, the sample and
model records, small helpers. Tiny random models of many architectures, built offline from transformers config
classes (no Hub), for the architecture matrix (tests/test_arch_matrix.py).

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
