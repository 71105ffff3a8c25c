"""Closed-set scoring by log-likelihood: each candidate's score is the sum of the log-probabilities of its tokens
given the prompt; the prediction is the argmax. No generation, no substring matching.

Batched for speed: each prompt runs once (left-padded, with explicit position ids so positions match training),
followed by the tokens all its candidates share (" 0" ... " 9" share " "); the first token of each candidate after
them is read off that forward's last logits, so candidates that differ in one token cost one forward per prompt.
Remaining tokens of multi-token candidates run as one batch of continuations on a copy of the prompt's KV cache,
one row per distinct continuation input.
``share_prompt=False`` scores each (prompt + candidate) row in full instead: slower, and what LiME with
``n_gram > 1`` needs (its routing window state cannot follow a gathered cache).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from .data import Example
from .vlm import MiniVLM, PromptEncoder, stack_images

logger = logging.getLogger(__name__)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _needs_full_rows(lm: nn.Module) -> bool:
    """True when a LiME adapter routes with other tokens of the sequence (n > 1 windows or the opening: prompt sharing
    via a gathered cache is unsafe, the kept routing state cannot follow the gather)."""
    configs = getattr(lm, "peft_config", None) or {}
    return any(getattr(conf, "n_gram", 1) > 1 or getattr(conf, "ngram_mode", "") == "prefix" for conf in configs.values())


def _left_pad(encoded: list[tuple[list[int], list[bool]]], pad_id: int, device: torch.device):
    T = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    image_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (ids, img) in enumerate(encoded):
        n = len(ids)
        input_ids[b, T - n:] = torch.tensor(ids)
        attention_mask[b, T - n:] = 1
        image_mask[b, T - n:] = torch.tensor(img)
    return input_ids.to(device), attention_mask.to(device), image_mask.to(device)


def _task_kwargs(batch: Sequence[Example], rows: Optional[torch.Tensor], with_task_ids: bool, device) -> dict:
    if not with_task_ids:
        return {}
    ids = torch.tensor([ex.task_id for ex in batch], dtype=torch.long, device=device)
    return {"task_ids": ids if rows is None else ids[rows]}


def _common_prefix(candidates: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Leading tokens shared by every candidate, leaving each at least one token of its own."""
    limit = min(len(t) for t in candidates) - 1
    n = 0
    while n < limit and all(t[n] == candidates[0][n] for t in candidates):
        n += 1
    return candidates[0][:n]


@torch.no_grad()
def _score_shared(
    vlm: MiniVLM, enc: PromptEncoder, batch: Sequence[Example], with_task_ids: bool, max_rows: int
) -> list[list[float]]:
    device = _device(vlm)
    answers = [[enc.answer(c) for c in ex.candidates] for ex in batch]
    common = [_common_prefix(toks) for toks in answers]
    encoded = []
    for ex, shared in zip(batch, common):
        ids, img = enc.prompt(ex)
        encoded.append((ids + list(shared), img + [False] * len(shared)))
    input_ids, attention_mask, image_mask = _left_pad(encoded, enc.pad_token_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    pixel_values = stack_images(list(batch), vlm.projector.config.image_size).to(device)
    embeds = vlm.embed(input_ids, pixel_values, image_mask)
    keep = max(len(c) for c in common) + 1
    out = vlm.lm(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=keep,
        **_task_kwargs(batch, None, with_task_ids, device),
    )
    logp = out.logits.float().log_softmax(-1)  # (B, keep, V); position keep - 1 is each row's last token
    scores: list[list[float]] = []
    # Continuation rows: one per distinct (prompt, candidate tokens but the last); candidates sharing that input
    # read their last token off the same row. Tokens shared by all candidates of an example ran with the prompt.
    row_of: dict[tuple[int, tuple[int, ...]], int] = {}
    rows: list[tuple[int, tuple[int, ...]]] = []
    targets: list[tuple[int, int, int, tuple[int, ...]]] = []  # (example, candidate, row, tokens)
    for b, (cand_toks, shared) in enumerate(zip(answers, common)):
        n = len(shared)
        base = sum(float(logp[b, keep - 1 - n + j, t]) for j, t in enumerate(shared))
        row_scores = []
        for c, full in enumerate(cand_toks):
            toks = full[n:]
            row_scores.append(base + float(logp[b, keep - 1, toks[0]]))
            if len(toks) > 1:
                key = (b, toks[:-1])
                if key not in row_of:
                    row_of[key] = len(rows)
                    rows.append(key)
                targets.append((b, c, row_of[key], toks))
        scores.append(row_scores)
    prompt_len = attention_mask.sum(-1)
    logps: list[torch.Tensor] = []
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        idx = torch.tensor([b for b, _ in chunk], dtype=torch.long, device=device)
        L = max(len(t) for _, t in chunk)
        cont = torch.full((len(chunk), L), enc.pad_token_id, dtype=torch.long)
        cont_mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, (_, inp) in enumerate(chunk):
            cont[r, :len(inp)] = torch.tensor(inp)
            cont_mask[r, :len(inp)] = 1
        cont, cont_mask = cont.to(device), cont_mask.to(device)
        cache = copy.deepcopy(out.past_key_values)
        cache.reorder_cache(idx)
        out2 = vlm.lm(
            input_ids=cont,
            attention_mask=torch.cat([attention_mask[idx], cont_mask], dim=1),
            position_ids=prompt_len[idx, None] + torch.arange(L, device=device),
            past_key_values=cache,
            use_cache=True,
            **_task_kwargs(batch, idx, with_task_ids, device),
        )
        logps.extend(out2.logits.float().log_softmax(-1).unbind(0))
    for b, c, r, toks in targets:
        tail = torch.tensor(toks[1:], device=device)
        scores[b][c] += float(logps[r][torch.arange(len(tail), device=device), tail].sum())
    return scores


@torch.no_grad()
def _score_full(
    vlm: MiniVLM, enc: PromptEncoder, batch: Sequence[Example], with_task_ids: bool, max_rows: int
) -> list[list[float]]:
    """Each (prompt + candidate) as its own left-padded row: the reference the shared path must match."""
    device = _device(vlm)
    rows = [(b, c) for b, ex in enumerate(batch) for c in range(len(ex.candidates))]
    scores = [[0.0] * len(ex.candidates) for ex in batch]
    prompts = [enc.prompt(ex) for ex in batch]
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        answers = [enc.answer(batch[b].candidates[c]) for b, c in chunk]
        encoded = [(prompts[b][0] + list(t), prompts[b][1] + [False] * len(t)) for (b, _), t in zip(chunk, answers)]
        input_ids, attention_mask, image_mask = _left_pad(encoded, enc.pad_token_id, device)
        idx = torch.tensor([b for b, _ in chunk], dtype=torch.long, device=device)
        pixel_values = stack_images([batch[b] for b, _ in chunk], vlm.projector.config.image_size).to(device)
        keep = max(len(t) for t in answers) + 1
        out = vlm.lm(
            inputs_embeds=vlm.embed(input_ids, pixel_values, image_mask),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp_min(0),
            logits_to_keep=keep,
            **_task_kwargs(batch, idx, with_task_ids, device),
        )
        logp = out.logits.float().log_softmax(-1)  # (R, keep, V): position keep-1 is the row's last token
        for r, ((b, c), toks) in enumerate(zip(chunk, answers)):
            pos = torch.arange(keep - 1 - len(toks), keep - 1, device=device)
            scores[b][c] = float(logp[r, pos, torch.tensor(toks, device=device)].sum())
    return scores


def score_examples(
    vlm: MiniVLM,
    encoder: PromptEncoder,
    examples: Sequence[Example],
    batch_size: int = 16,
    with_task_ids: bool = False,
    share_prompt: Optional[bool] = None,
    max_rows: int = 64,
    progress: bool = True,
    desc: str = "scoring",
) -> list[list[float]]:
    """Log-likelihood of every candidate of every example (same order as ``examples`` and their candidates).

    Args:
        vlm: the model (its ``lm`` may be a plain causal LM or a PeftModel).
        encoder: the PromptEncoder used in training.
        batch_size: prompts per forward (examples are sorted by prompt length to limit padding).
        with_task_ids: pass ``task_ids`` to the PeftModel (LiME per-task routing telemetry; needs
            ``peft_lime.enable_task_ids``).
        share_prompt: run each prompt once and continue candidates on its KV cache (default: yes, unless a LiME
            adapter uses n-gram windows).
        max_rows: candidate rows per continuation forward.
    """
    from tqdm.auto import tqdm

    if share_prompt is None:
        share_prompt = not _needs_full_rows(vlm.lm)
    score_fn = _score_shared if share_prompt else _score_full
    was_training = vlm.training
    vlm.eval()
    order = sorted(range(len(examples)), key=lambda i: len(encoder.prompt(examples[i])[0]))
    out: list[Optional[list[float]]] = [None] * len(examples)
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            ids = order[start:start + batch_size]
            batch_scores = score_fn(vlm, encoder, [examples[i] for i in ids], with_task_ids, max_rows)
            for i, s in zip(ids, batch_scores):
                out[i] = s
    finally:
        vlm.train(was_training)
    return [s for s in out if s is not None]


def predictions(scores: Sequence[Sequence[float]]) -> list[int]:
    """Argmax candidate index per example."""
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def accuracy_report(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per-task accuracy, macro mean over tasks, mean per modality, and counts."""
    if len(examples) != len(scores):
        raise ValueError(f"scores: {len(scores)} score rows for {len(examples)} examples")
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    modality: dict[str, str] = {}
    for ex, pred in zip(examples, predictions(scores)):
        total[ex.task] += 1
        correct[ex.task] += int(pred == ex.label_index)
        modality[ex.task] = ex.modality
    per_task = {t: correct[t] / total[t] for t in total}
    by_mod: dict[str, list[float]] = defaultdict(list)
    for t, acc in per_task.items():
        by_mod[modality[t]].append(acc)
    return {
        "per_task": per_task,
        "macro": sum(per_task.values()) / max(len(per_task), 1),
        "per_modality": {m: sum(v) / len(v) for m, v in by_mod.items()},
        "n": dict(total),
    }
