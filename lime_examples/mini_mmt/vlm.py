"""Images into a text LM, LLaVA-style: patches -> trainable projector -> embeddings at placeholder tokens.

Each prompt with an image reserves ``num_image_tokens`` placeholder tokens right after the tokenizer's leading
special tokens. ``MiniVLM.embed`` looks up the LM's input embeddings and overwrites the placeholder positions
(given by an explicit boolean ``image_mask``, so the placeholder id may be any token) with the projector's output;
the LM then runs on ``inputs_embeds``. LiME's router sees image and text tokens alike.

The projector is a plain ``nn.Module`` outside the PEFT model: it trains with the adapter (its parameters require
grad and sit in the same ``MiniVLM``) and is saved next to the adapter as ``projector.safetensors`` with its
``projector_config.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .data import IMAGE_SIZE, Example

logger = logging.getLogger(__name__)

PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector_config.json"


@dataclass(frozen=True)
class ProjectorConfig:
    """Shape of the patch projector."""

    hidden_size: int
    image_size: int = IMAGE_SIZE
    patch_size: int = 8
    channels: int = 3

    @property
    def num_patches(self) -> int:
        """Number of image tokens one image becomes."""
        return (self.image_size // self.patch_size) ** 2


class PatchProjector(nn.Module):
    """Split an image into non-overlapping patches, project each to the LM's embedding space.

    patch pixels -> Linear -> + learned patch position -> LayerNorm -> * scale. The scale is learnable and starts at
    the RMS of the LM's token embeddings (``embed_rms``), so image tokens enter the LM at the norm of text tokens.
    """

    def __init__(self, config: ProjectorConfig, embed_rms: float = 1.0) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"patch_size: {config.patch_size} does not divide image_size {config.image_size}")
        self.config = config
        patch_dim = config.channels * config.patch_size**2
        self.proj = nn.Linear(patch_dim, config.hidden_size)
        self.position = nn.Parameter(torch.randn(config.num_patches, config.hidden_size) * 0.02)
        self.norm = nn.LayerNorm(config.hidden_size, elementwise_affine=False)
        self.scale = nn.Parameter(torch.tensor(float(embed_rms)))

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_patches, C * p * p), patches in row-major order."""
        B, C, H, W = pixel_values.shape
        c = self.config
        if (C, H, W) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"pixel_values: expected (B, {c.channels}, {c.image_size}, {c.image_size}), got {tuple(pixel_values.shape)}")
        p = c.patch_size
        x = pixel_values.unfold(2, p, p).unfold(3, p, p)  # B, C, H/p, W/p, p, p
        return x.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * p * p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, num_patches, hidden_size)."""
        x = self.patchify((pixel_values.to(self.proj.weight.dtype) - 0.5) / 0.5)
        return self.norm(self.proj(x) + self.position) * self.scale


def embedding_rms(lm: nn.Module) -> float:
    """Root-mean-square norm per channel of the LM's input embedding table."""
    weight = lm.get_input_embeddings().weight
    return float(weight.detach().float().pow(2).mean().sqrt())


def save_projector(projector: PatchProjector, folder: str | Path) -> None:
    """Write ``projector.safetensors`` and ``projector_config.json`` into ``folder`` (next to the adapter)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    save_file(state, str(folder / PROJECTOR_WEIGHTS))
    (folder / PROJECTOR_CONFIG).write_text(json.dumps(asdict(projector.config), indent=2))


def load_projector(folder: str | Path, device: Optional[torch.device | str] = None) -> PatchProjector:
    """Rebuild a projector saved by ``save_projector``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = ProjectorConfig(**json.loads((folder / PROJECTOR_CONFIG).read_text()))
    projector = PatchProjector(config)
    projector.load_state_dict(load_file(str(folder / PROJECTOR_WEIGHTS)))
    return projector.to(device) if device is not None else projector


class MiniVLM(nn.Module):
    """A causal LM (plain or PEFT-wrapped) plus a patch projector; forward takes the TrainCollator's batch."""

    def __init__(self, lm: nn.Module, projector: PatchProjector) -> None:
        super().__init__()
        self.lm = lm
        self.projector = projector

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings with the projector's output written at ``image_mask`` positions.

        Rows with an image must have exactly ``num_patches`` True entries in ``image_mask``; rows without one none.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        if pixel_values is None or image_mask is None or not bool(image_mask.any()):
            return embeds
        rows = image_mask.any(dim=-1)
        image_tokens = self.projector(pixel_values[rows])  # (R, N, H)
        expected = image_tokens.shape[0] * image_tokens.shape[1]
        if int(image_mask.sum()) != expected:
            raise ValueError(
                f"image_mask: {int(image_mask.sum())} image positions for {int(rows.sum())} images of "
                f"{image_tokens.shape[1]} tokens each"
            )
        mask = image_mask.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, image_tokens.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        task_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        """Causal-LM forward on the merged embeddings; ``task_ids`` go to the PEFT model (LiME telemetry).

        With ``labels``, the LM head runs only from the position before the first labelled token to the end (the
        loss is the same, the 49k-way head over prompt positions is skipped): with left padding (``TrainCollator(...,
        padding_side="left")``) that is the answer tokens plus one.
        """
        if task_ids is not None:
            kwargs["task_ids"] = task_ids
        if labels is not None and "logits_to_keep" not in kwargs:
            labelled = (labels != -100).any(dim=0).nonzero()
            if len(labelled):
                keep = labels.shape[1] - int(labelled[0]) + 1
                kwargs["logits_to_keep"] = keep
                labels = labels[:, -keep:]
        embeds = self.embed(input_ids, pixel_values, image_mask)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)


class PromptEncoder:
    """Token ids of prompts (with image placeholders) and of candidate answers, consistently for training and scoring.

    A prompt is: the tokenizer's leading special tokens, ``num_image_tokens`` placeholders if the example has an
    image, then the prompt text (left-truncated to ``max_prompt_tokens`` so its ending, the answer cue, survives).
    A candidate answer is ``" " + text`` without special tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        num_image_tokens: int,
        image_token_id: Optional[int] = None,
        max_prompt_tokens: int = 80,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        fallback = [tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, 0]
        self.image_token_id = image_token_id if image_token_id is not None else next(i for i in fallback if i is not None)
        self.pad_token_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.max_prompt_tokens = max_prompt_tokens
        with_special = tokenizer("x", add_special_tokens=True).input_ids
        plain = tokenizer("x", add_special_tokens=False).input_ids
        start = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain), 0)
        self.prefix: list[int] = list(with_special[:start])
        self._answer = lru_cache(maxsize=4096)(self._encode_answer)

    def prompt(self, example: Example) -> tuple[list[int], list[bool]]:
        """(token ids, image mask) of an example's prompt."""
        text = self.tokenizer(example.prompt, add_special_tokens=False).input_ids[-self.max_prompt_tokens:]
        n_img = self.num_image_tokens if example.image is not None else 0
        ids = self.prefix + [self.image_token_id] * n_img + list(text)
        mask = [False] * len(self.prefix) + [True] * n_img + [False] * len(text)
        return ids, mask

    def _encode_answer(self, text: str) -> tuple[int, ...]:
        ids = tuple(self.tokenizer(" " + text, add_special_tokens=False).input_ids)
        if not ids:
            raise ValueError(f"candidate {text!r} encodes to no tokens")
        return ids

    def answer(self, text: str) -> tuple[int, ...]:
        """Token ids of a candidate answer as it continues the prompt."""
        return self._answer(text)


class TrainCollator:
    """Batches for teacher-forced training: labels on the answer tokens only, right padding.

    Emits input_ids, attention_mask, labels, pixel_values (zeros for text rows), image_mask and task_ids. Items may
    be Examples or ``{"example": Example, ...}`` dicts (see ``length_indexed``). ``padding_side="left"`` puts every
    answer at the end of its row (so ``MiniVLM`` runs the LM head on the last few positions only) and adds
    ``position_ids`` counting from each row's first real token, as the scorer does.
    """

    def __init__(self, encoder: PromptEncoder, image_size: int = IMAGE_SIZE, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        self.encoder = encoder
        self.image_size = image_size
        self.padding_side = padding_side

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """Collate a list of Examples (or ``{"example": ...}`` dicts) into tensors."""
        examples = [it["example"] if isinstance(it, dict) else it for it in items]
        rows = []
        for ex in examples:
            ids, img = self.encoder.prompt(ex)
            answer = list(self.encoder.answer(ex.label))
            rows.append((ids + answer, img + [False] * len(answer), [-100] * len(ids) + answer))
        T = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.encoder.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        image_mask = torch.zeros((B, T), dtype=torch.bool)
        for b, (ids, img, lab) in enumerate(rows):
            n = len(ids)
            cols = slice(T - n, T) if self.padding_side == "left" else slice(0, n)
            input_ids[b, cols] = torch.tensor(ids)
            attention_mask[b, cols] = 1
            labels[b, cols] = torch.tensor(lab)
            image_mask[b, cols] = torch.tensor(img)
        extra = {}
        if self.padding_side == "left":
            extra["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": stack_images(examples, self.image_size),
            "image_mask": image_mask,
            "task_ids": torch.tensor([ex.task_id for ex in examples], dtype=torch.long),
            **extra,
        }


def length_indexed(examples: list[Example], encoder: PromptEncoder) -> list[dict[str, Any]]:
    """``[{"input_ids": prompt + answer ids, "example": ex}]``: what Trainer's group_by_length sampler reads lengths
    from, so batches hold prompts of similar length (less padding, faster steps on CPU)."""
    out = []
    for ex in examples:
        ids = encoder.prompt(ex)[0] + list(encoder.answer(ex.label))
        out.append({"input_ids": ids, "example": ex})
    return out


def stack_images(examples: list[Example], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, 3, S, S) pixel batch; zeros for examples without an image."""
    out = torch.zeros(len(examples), 3, image_size, image_size)
    for b, ex in enumerate(examples):
        if ex.image is not None:
            out[b] = ex.image
    return out
