"""Tiny random models of many architectures, built offline from transformers config classes (no Hub), for the
architecture matrix (tests/test_arch_matrix.py): the registry of builders by family, and batching.

The builders live in tests/_arch_text.py and tests/_arch_multimodal.py, the shared records and sizes in
tests/_arch_common.py (input layouts are described there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._arch_common import PAD, ArchModel, Sample
from ._arch_multimodal import bart, clip_vision, idefics3, llava, paligemma, qwen2_vl, smolvlm, t5, vit, whisper
from ._arch_text import (
    bert,
    distilbert,
    falcon,
    gemma,
    gemma2,
    gpt2,
    gpt_neox,
    llama,
    mamba,
    mistral,
    mixtral,
    opt,
    phi,
    phi3,
    qwen2,
    qwen3,
    qwen3_moe,
    roberta,
)

__all__ = ["ARCHS", "FAMILY_OF", "PAD", "ArchModel", "Sample", "build", "collate", "samples"]

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
